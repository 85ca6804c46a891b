"""Process-level tuning shared by the CPU entry points (encode, evaluate, pretrain, finetune).

glibc hands every allocation above its mmap threshold (128 KiB to start with) a fresh mmap and
returns it to the kernel on free, so each activation of a CPU forward is page-faulted and
zero-filled again on every use. Raising the threshold and the trim threshold keeps freed
activations in the heap for the next batch, as the CUDA caching allocator does on a GPU: on the
2-core CI machine this made the packed SmolLM2 encoder ~1.3x faster (benchmarks/results/).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
_tuned: bool | None = None


def tune_cpu_malloc() -> bool:
    """Keep freed CPU activations in the heap instead of returning them to the kernel.

    Idempotent; a no-op (False) off glibc or when LLARA_FAST_MALLOC_TUNE=0. Blocks above 32 MiB
    still come from mmap, so the retained heap is bounded by the working set of small blocks."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("LLARA_FAST_MALLOC_TUNE", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    ok &= mallopt(_M_TOP_PAD, 64 << 20) == 1
    _tuned = bool(ok)
    return _tuned
