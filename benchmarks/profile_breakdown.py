"""Where a training step's time goes: one step under torch.profiler, grouped (issue #15).

    from profile_breakdown import profile_step
    report = profile_step(lambda: trainer.step(batches), device)   # a dict; format_breakdown(report)

Groups (by kernel name on a GPU, by operator name on a CPU; first match wins):
- gemm: matrix products (cuBLAS / CUTLASS / nvjet kernels; aten::mm, addmm, bmm, matmul), including
  the GEMMs inside the fused losses;
- attention: flash / memory-efficient / varlen / flex attention kernels;
- loss: our Triton loss kernels (linear_xent's and bow_xent's row kernels) and their CPU row passes;
- optimizer: AdamW (fused / foreach / multi-tensor kernels);
- fsdp_copies: FSDP2's all-gather / reduce-scatter copies, dtype casts and other copies;
- elementwise: everything else (norms, RoPE, SwiGLU, reductions, fills, indexing);
- idle (GPU): the step's wall time minus the time some kernel ran (kernels of one stream do not
  overlap, so this is the time the GPU waited for the host).
On a CPU the groups are operators' self time summed over threads, so they can exceed the wall time;
`idle` is not defined there.
"""
from __future__ import annotations

import re
import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

GROUPS = ("gemm", "attention", "loss", "optimizer", "fsdp_copies", "elementwise")
_PATTERNS = [  # (group, regex on the lower-cased kernel / operator name); first match wins
    ("loss", r"_xent|bow_|lse_|xent_rows"),
    ("attention", r"flash|fmha|attention|sdpa|flex|varlen|_efficient_attention"),
    ("optimizer", r"adam|multi_tensor|_foreach_(?!copy)|lerp|optimizer"),
    ("fsdp_copies", r"all_gather|reduce_scatter|nccl|chunk_cat|split_with_sizes|foreach_copy|copy_|_to_copy|"
                    r"\bcopy\b|cast|memcpy|convert|unrolled_elementwise_kernel<.*copy"),
    ("gemm", r"gemm|cutlass|nvjet|sm\d+_xmma|cublas|aten::(mm|addmm|bmm|matmul|linear|baddbmm)\b|"
             r"^(mm|addmm|bmm|matmul)$|splitk|matmul"),
]


def classify(name: str) -> str:
    n = name.lower()
    for group, pat in _PATTERNS:
        if re.search(pat, n):
            return group
    return "elementwise"


def _device_us(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def profile_step(step: Callable[[], object], device: torch.device) -> dict:
    """Run step() once under the profiler; returns the wall time and the per-group times (ms)."""
    gpu = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=acts) as prof:
        if gpu:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if gpu:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    groups = dict.fromkeys(GROUPS, 0.0)
    top: dict[str, list] = {}
    for evt in prof.key_averages():
        if gpu:  # kernels (and memcpy / memset) only: an operator's device time is its kernels'
            us = _device_us(evt)
            if us <= 0 or getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
        else:
            us = float(evt.self_cpu_time_total)
            if us <= 0 or not evt.key.startswith("aten::"):
                continue  # Python scopes and profiler markers would double-count their ops
        g = classify(evt.key)
        groups[g] += us / 1e3
        top.setdefault(g, []).append((us / 1e3, evt.key))
    busy = sum(groups.values())
    report = {"device": device.type, "wall_ms": round(wall_ms, 2),
              "groups_ms": {k: round(v, 2) for k, v in groups.items()},
              "busy_ms": round(busy, 2),
              "idle_ms": round(max(0.0, wall_ms - busy), 2) if gpu else None,
              "top": {g: [(round(ms, 2), k[:90]) for ms, k in sorted(v, reverse=True)[:5]] for g, v in top.items()}}
    return report


def format_breakdown(r: dict, title: str = "") -> str:
    rows = [f"profile{': ' + title if title else ''} ({r['device']}, one step, wall {r['wall_ms']:.1f} ms)",
            f"{'group':<12} {'ms':>9} {'of wall':>8}"]
    items = list(r["groups_ms"].items()) + ([("idle", r["idle_ms"])] if r["idle_ms"] is not None else [])
    for k, v in items:
        rows.append(f"{k:<12} {v:>9.1f} {v / r['wall_ms']:>8.1%}")
    for g, lst in r["top"].items():
        rows.append(f"  {g}: " + "; ".join(f"{k} {ms:.1f} ms" for ms, k in lst[:3]))
    return "\n".join(rows)
