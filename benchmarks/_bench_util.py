"""Shared machinery for the kernel benchmarks (bench_bow_xent.py, bench_linear_xent.py).

Cases, for each implementation (``ours``, ``reference``, and ``gemm`` = the bare GEMMs of the
same shapes: on CUDA by default, --gemm on elsewhere):
- ``fwd``: the loss only, inputs not requiring grad (what evaluation pays);
- ``fwd+bwd``: leaf inputs requiring grad, ``loss.backward()`` (what a training step pays).
  For ``gemm``: the (rows, d) x (d, V) logits GEMM, then G (rows, V) x W (V, d) and
  G^T (V, rows) x H (rows, d), with G a ready-made logits gradient in the compute dtype.
GFLOP/s counts the GEMM work only: 2·rows·d·V forward, 3x that with backward. Ours is also
checked to agree with the reference on the loss. The table comes first, one JSON line last.

Table columns: median ms; GFLOP/s of the GEMM work; peak MiB; -grads MiB = peak minus the
gradients the call returns (hidden and weight, in the input dtype), the working memory an
implementation adds beyond what any implementation must hand back; ratios to the reference
in the same pass.

Timing: ``warmup`` calls, then ``iters`` calls timed one by one with ``time.perf_counter``
(bracketed by ``torch.cuda.synchronize()`` on a GPU); the median is reported.

Peak memory is the most extra memory one call holds at once, above what existed before it
(inputs, and on CUDA the saved cuBLAS workspace), counting what it returns (loss, gradients):
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` just before the call. Measured in the benchmark's own process.
- CPU: the kernel's resident set size (RSS), measured in a fresh subprocess per case, so no
  case inherits another's freed-but-kept heap. The subprocess builds the same inputs, makes
  one warm-up call (thread pools, oneDNN primitives), drops its results, resets the kernel's
  RSS high-water mark (``echo 5 > /proc/self/clear_refs``), reads VmRSS as the baseline, makes
  the measured call and reads VmHWM: peak = VmHWM - baseline. It runs with glibc's
  ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB (fixing it also turns off glibc's dynamic
  threshold), so every tensor larger than that is its own mapping, returned to the kernel when
  freed, and ``malloc_trim(0)`` runs before the baseline, so that smaller allocations served
  from freed heap holes touch fresh pages too: RSS then follows live bytes and the high-water
  mark is the true peak. This counts
  every touched page, including library workspaces that torch's allocator never sees; pages
  allocated but never written are not counted (they cost nothing). Resolution: 4 KiB pages.
  Where clear_refs cannot be written (not Linux, or forbidden) the CPU peak is reported as
  None rather than guessed. Cross-check (2026-11-22, default shapes, all 8 CPU cases of both
  benchmarks): the peak of live bytes from ``torch.profiler.profile(profile_memory=True)``
  memory events agreed with these RSS figures to within 2.5 MiB.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

MiB = 2**20
MEM_CASE_FLAG = "--_mem-case"  # internal: run one case's memory measurement and print JSON


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available to this torch build")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # bf16 is what a GPU trains in; CPU bf16 GEMMs without AMX/avx512_bf16 are slow
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}[name]


def add_run_args(p) -> None:
    """The arguments every kernel benchmark takes: device, dtype, timing, memory, seed."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")
    p.add_argument("--iters", type=int, default=None, help="timed calls per case (default 3 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 1 CPU, 3 CUDA)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(MEM_CASE_FLAG, dest="mem_case", default=None, help="(internal)")


def add_common_args(p) -> None:
    """add_run_args and the loss benchmarks' shapes and switches."""
    add_run_args(p)
    p.add_argument("--vocab", type=int, default=49152 + 16, help="SmolLM2 vocabulary + 16 special tokens")
    p.add_argument("--dim", type=int, default=576, help="hidden size (576 = SmolLM2-135M, 4096 = llama2-7b)")
    p.add_argument("--impl", default="auto", choices=["auto", "triton", "torch"],
                   help="ours: auto = Triton on CUDA, chunked PyTorch on CPU")
    p.add_argument("--gemm", default="auto", choices=["auto", "on", "off"],
                   help="also time the bare GEMMs of the same shapes (auto: on CUDA only)")


class Case:
    """One timed, memory-measured call. ``fn`` runs the call and returns what it produced (kept
    alive until the measurement ends); ``reset`` drops state a previous call left (gradients)."""

    def __init__(self, name: str, impl: str, mode: str, fn: Callable, flops: float,
                 reset: Callable | None = None, grad_bytes: int = 0):
        self.name, self.impl, self.mode, self.fn, self.flops = name, impl, mode, fn, flops
        self.reset = reset or (lambda: None)
        self.grad_bytes = grad_bytes  # the gradients the call must return: part of any implementation's peak


def loss_cases(ops: dict[str, Callable], hidden: torch.Tensor, weight: torch.Tensor, flops: float,
               grad_logits: torch.Tensor | None = None) -> list[Case]:
    """fwd and fwd+bwd cases for each ``ops[impl](hidden, weight) -> scalar loss``, plus the
    bare GEMM cases when ``grad_logits`` (rows, V) is given (hidden is viewed as (rows, d))."""
    h1, w1 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()  # leaves
    grads = (hidden.numel() + weight.numel()) * hidden.element_size()  # dH + dW, in the input dtype

    def reset():
        h1.grad = w1.grad = None

    def fwd(op):
        return lambda: op(hidden, weight)

    def fwd_bwd(op):
        def run():
            loss = op(h1, w1)
            loss.backward()
            return loss.detach()
        return run

    cases = []
    for impl, op in ops.items():
        cases += [Case(f"{impl}:fwd", impl, "fwd", fwd(op), flops),
                  Case(f"{impl}:fwd+bwd", impl, "fwd+bwd", fwd_bwd(op), 3 * flops, reset, grads)]
    if grad_logits is not None:
        h2, g = hidden.reshape(-1, hidden.shape[-1]), grad_logits  # (rows, d), (rows, V)

        def gemm_fwd_bwd():
            logits = h2 @ weight.t()  # (rows, V)
            return logits, g @ weight, g.t() @ h2  # dH (rows, d), dW (V, d)

        cases += [Case("gemm:fwd", "gemm", "fwd", lambda: h2 @ weight.t(), flops),  # (rows, V)
                  Case("gemm:fwd+bwd", "gemm", "fwd+bwd", gemm_fwd_bwd, 3 * flops, grad_bytes=grads)]
    return cases


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(case: Case, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of one call."""
    for _ in range(warmup):
        case.reset()
        case.fn()
    times = []
    for _ in range(iters):
        case.reset()
        _sync(device)
        t0 = time.perf_counter()
        case.fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    case.reset()
    return statistics.median(times)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _malloc_trim() -> None:
    """Return glibc's free heap pages (holes in the middle of the heap included) to the kernel,
    so that a later allocation served from such a hole touches fresh pages and shows in RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes_here(case: Case, device: torch.device) -> int | None:
    """Peak extra bytes of one call, measured in this process (CUDA allocator, or RSS on CPU:
    for CPU call this in a fresh process, see measure_peaks)."""
    case.reset()
    case.fn()  # warm-up: lazy initialisation is not the call's memory
    case.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = case.fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        case.reset()
        return peak
    _malloc_trim()
    if not _reset_rss_peak():
        return None
    base = _proc_status_kib("VmRSS")
    out = case.fn()
    peak = _proc_status_kib("VmHWM") - base
    del out
    case.reset()
    return peak * 1024


def measure_peaks(cases: list[Case], device: torch.device, script: str, argv: list[str]) -> dict[str, int | None]:
    """{case name: peak extra bytes}. On CPU each case runs in a fresh subprocess of ``script``
    with the same arguments plus MEM_CASE_FLAG (see the module docstring)."""
    if device.type == "cuda":
        out = {}
        for c in cases:
            out[c.name] = peak_bytes_here(c, device)
            gc.collect()
            torch.cuda.empty_cache()
        return out
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = {}
    for c in cases:
        r = subprocess.run([sys.executable, script, *argv, "--device", "cpu", MEM_CASE_FLAG, c.name],
                           env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"memory subprocess for {c.name} failed:\n{r.stderr[-4000:]}")
        out[c.name] = json.loads(r.stdout.strip().splitlines()[-1])["peak_bytes"]
    return out


def run_mem_case(cases: list[Case], name: str, device: torch.device) -> None:
    """Body of the memory subprocess: measure one case, print {"peak_bytes": ...}."""
    case = next(c for c in cases if c.name == name)
    print(json.dumps({"case": name, "peak_bytes": peak_bytes_here(case, device)}))


def run_bench(bench: str, a, argv: list[str], script: str, device: torch.device, cases: list[Case],
              meta: dict, check: Callable[[], dict] | None = None, notes: Callable[[], str] | None = None,
              ref_impl: str | Callable[[str], str] = "reference") -> dict | None:
    """The flow both kernel benchmarks share: in the memory subprocess measure one case and
    stop; otherwise time every case, run ``check`` (its dict joins the metadata), measure the
    peaks, print the table, ``notes`` and the JSON line last."""
    if a.mem_case:
        run_mem_case(cases, a.mem_case, device)
        return None
    warmup = a.warmup if a.warmup is not None else (3 if device.type == "cuda" else 1)
    iters = a.iters if a.iters is not None else (20 if device.type == "cuda" else 3)
    seconds = {c.name: time_case(c, device, warmup, iters) for c in cases}
    meta = {"device": device_label(device), **meta, "iters": iters, "warmup": warmup, **(check() if check else {})}
    peaks = {} if a.no_memory else measure_peaks(cases, device, script, argv)
    res = report(bench, meta, cases, seconds, peaks, ref_impl)
    if notes:
        print(notes())
    print(json.dumps(res))
    return res


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores ({platform.machine()})"


def versions() -> dict:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    return {"torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda}


def report(bench: str, meta: dict, cases: list[Case], seconds: dict, peaks: dict,
           ref_impl: str | Callable[[str], str] = "reference") -> dict:
    """Print the table (ratios against ``ref_impl`` in the same mode; a callable names each
    impl's own baseline) and return the JSON record."""
    base = ref_impl if callable(ref_impl) else (lambda _impl: ref_impl)
    rows = []
    print(f"{bench}: " + ", ".join(f"{k}={v}" for k, v in meta.items()))
    w = max([10] + [len(c.impl) for c in cases])
    hdr = (f"{'impl':<{w}} {'pass':<8} {'median ms':>10} {'GFLOP/s':>9} {'peak MiB':>9} {'-grads MiB':>10} "
           f"{'time/ref':>9} {'mem/ref':>8} {'-grads/ref':>10}")
    print(hdr)
    print("-" * len(hdr))
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    ratio = lambda x, y: x / y if x is not None and y else None  # noqa: E731
    for c in cases:
        ref = next((r for r in cases if r.impl == base(c.impl) and r.mode == c.mode), None)
        s, pk = seconds[c.name], peaks.get(c.name)
        ex = None if pk is None else pk - c.grad_bytes  # the working memory beyond the returned gradients
        rpk = peaks.get(ref.name) if ref else None
        rex = None if rpk is None else rpk - ref.grad_bytes
        t_ratio = s / seconds[ref.name] if ref else None
        mib = lambda x: None if x is None else x / MiB  # noqa: E731
        rows.append({"name": c.name, "impl": c.impl, "pass": c.mode, "ms": s * 1e3, "gflops": c.flops / s / 1e9,
                     "peak_mib": mib(pk), "grads_mib": c.grad_bytes / MiB, "peak_minus_grads_mib": mib(ex),
                     "time_vs_ref": t_ratio, "mem_vs_ref": ratio(pk, rpk), "mem_minus_grads_vs_ref": ratio(ex, rex)})
        print(f"{c.impl:<{w}} {c.mode:<8} {s * 1e3:>10.1f} {c.flops / s / 1e9:>9.1f} {fmt(mib(pk), '9.1f'):>9} "
              f"{fmt(mib(ex), '10.1f'):>10} {fmt(t_ratio, '9.2f'):>9} {fmt(ratio(pk, rpk), '8.3f'):>8} "
              f"{fmt(ratio(ex, rex), '10.3f'):>10}")
    return {"bench": bench, **meta, "versions": versions(), "cases": rows}
