"""The packed attention backends on one training batch (DESIGN §4): time and peak memory of one
attention call, forward and forward+backward, every backend this machine has.

    python benchmarks/bench_branch_attention.py [--device auto] [--dtype auto] [--examples 32]
        [--text-len 500] [--text-len-min N] [--heads 32] [--kv-heads 32] [--head-dim 128]
        [--backends all|sdpa,triton,...] [--iters N] [--warmup N] [--no-memory]

The batch is what the packer lays out for --examples passages of --text-len-min..--text-len
tokens (uniform; default all --text-len: the released data's shape), with the LLaRA template's
pieces (2 prefix tokens, 11 SUM, 10 PRED): per example a main segment BOS..SUM and a PRED
branch that also reads its example's BOS..TEXT. q (N, H, D), k and v (N, KV, D) random.
- ``triton``: ours, kernels/branch_attention.py: the branch reads its context in place;
- ``torch_varlen`` / ``flash_attn``: FlashAttention over gathered K/V (k_index), the GPU default;
- ``flex``: flex_attention with the mask rule, compiled; ``sdpa``: per-example dense masks.
The ratios are against torch_varlen on CUDA (the backend ``auto`` picks there without flash-attn),
sdpa elsewhere. Building the backend's per-batch metadata (once per step, shared by all layers)
is timed apart and printed under the table. GFLOP/s counts 4·pairs·H·D forward (QKᵀ and PV over
the pairs the mask allows) and 2.5x that in backward, FlashAttention's convention. Every backend's
output and gradients are compared with sdpa's (max abs difference, in the JSON). Timing and
peak memory: benchmarks/_bench_util.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import Case, add_run_args, resolve_device, resolve_dtype, run_bench  # noqa: E402

from llara_fast.attention import available_backends, build_meta, packed_attention  # noqa: E402
from llara_fast.batch import Example  # noqa: E402
from llara_fast.data.packing import pack_reference  # noqa: E402
from llara_fast.templates import Template  # noqa: E402

VOCAB = 32000


def bench_template() -> Template:
    """The shapes of the LLaRA template (ids are irrelevant to attention): BOS + one prompt token,
    SUM = 3 prompt tokens + <s1>..<s8>, PRED = 2 prompt tokens + <s9>..<s16>."""
    new = list(range(VOCAB - 16, VOCAB))
    return Template((1, 5), (7, 8, 9, *new[:8]), (10, 11, *new[8:]), tuple(range(3, 11)), tuple(range(2, 10)),
                    frozenset([0, 1, 2, *new]), 8)


def make_batch(a, device: torch.device):
    rng = np.random.default_rng(a.seed)
    lo = a.text_len_min if a.text_len_min is not None else a.text_len
    lens = rng.integers(lo, a.text_len + 1, size=a.examples)
    ex = [Example(rng.integers(3, VOCAB - 16, size=int(n)), np.array([3], dtype=np.int64),
                  np.array([4], dtype=np.int64)) for n in lens]
    return pack_reference(ex, bench_template(), int(lens.max()) + 32).to(device)


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p)
    p.add_argument("--examples", type=int, default=32, help="passages in the batch")
    p.add_argument("--text-len", type=int, default=500, help="passage tokens (the longest, with --text-len-min)")
    p.add_argument("--text-len-min", type=int, default=None, help="shortest passage (default: --text-len)")
    p.add_argument("--heads", type=int, default=32, help="query heads (32 = llama2-7b)")
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--backends", default="all", help="comma list, or all (every backend available here)")
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    have = available_backends(device, dtype)
    names = have if a.backends == "all" else [b for b in a.backends.split(",") if b]
    missing = [b for b in names if b not in have]
    if missing:
        sys.exit(f"backends {missing} are unavailable on {device} in {dtype}; this machine has {have}")
    batch = make_batch(a, device)
    N, H, KV, D = batch.num_tokens, a.heads, a.kv_heads, a.head_dim
    gen = torch.Generator(device=device).manual_seed(a.seed)
    q, k, v = (torch.randn(N, h, D, generator=gen, device=device, dtype=dtype) for h in (H, KV, KV))
    do = torch.randn(N, H, D, generator=gen, device=device, dtype=dtype)
    metas = {}
    meta_ms = {}
    for b in names:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            metas[b] = build_meta(batch, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        meta_ms[b] = statistics.median(times) * 1e3
    flops = 4.0 * batch.attn_pairs() * H * D
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    grad_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))

    def reset():
        for t in leaves:
            t.grad = None

    def fwd(b):
        return lambda: packed_attention(q, k, v, metas[b])

    def fwd_bwd(b):
        def run():
            out = packed_attention(*leaves, metas[b])
            out.backward(do)
            return out.detach()
        return run

    cases = []
    for b in names:
        cases += [Case(f"{b}:fwd", b, "fwd", fwd(b), flops),
                  Case(f"{b}:fwd+bwd", b, "fwd+bwd", fwd_bwd(b), 3.5 * flops, reset, grad_bytes)]

    def check() -> dict:
        """max |backend - sdpa| of the output and each gradient (sdpa computed in fp32 on these inputs)."""
        if a.mem_case:
            return {}
        ref_leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref = packed_attention(*ref_leaves, build_meta(batch, "sdpa"))
        ref_grads = torch.autograd.grad(ref, ref_leaves, do.float())
        out = {}
        for b in names:
            ls = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            o = packed_attention(*ls, metas[b])
            gs = torch.autograd.grad(o, ls, do)
            out[f"max_abs_diff_{b}"] = [round((x.float() - y).abs().max().item(), 6)
                                        for x, y in zip((o, *gs), (ref, *ref_grads))]
        return out

    ref_impl = "torch_varlen" if "torch_varlen" in names else "sdpa"
    meta = {"dtype": str(dtype).replace("torch.", ""), "tokens": N, "examples": a.examples,
            "text_len": [a.text_len_min or a.text_len, a.text_len], "H": H, "KV": KV, "D": D,
            "attn_pairs": batch.attn_pairs(), "ratios_vs": ref_impl,
            "meta_ms": {b: round(t, 3) for b, t in meta_ms.items()}}
    notes = lambda: "per-batch metadata, ms (once per step): " + ", ".join(  # noqa: E731
        f"{b} {t:.2f}" for b, t in meta_ms.items())
    return run_bench("branch_attention", a, argv, os.path.abspath(__file__), device, cases, meta, check, notes,
                     ref_impl=ref_impl)


if __name__ == "__main__":
    main()
