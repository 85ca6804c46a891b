"""bow_xent (fused vocabulary projection + pooled bag-of-words CE, DESIGN §5) against the
materialised-logits reference: time and peak memory, forward and forward+backward.

    python benchmarks/bench_bow_xent.py [--device auto] [--dtype auto] [--vocab 49168] [--dim 576]
                                        [--examples 64] [--n-special 8] [--targets 480] [--pooling max]
                                        [--iters N] [--warmup N] [--gemm auto|on|off] [--impl auto]

Shapes: E examples, K = n_special hidden rows each (the special positions), weight (V, d),
CSR target sets of about --targets ids per example (uniform in [t/2, 3t/2], ids drawn with
replacement, so a few repeats: like the sets of unique ids of ~500-token passages).
- ``ours``: ``bow_xent(..., impl)``; auto = the Triton forward kernel on CUDA, the chunked
  PyTorch path on CPU; ours keeps the pooled (E, V) logits and does the gradient GEMMs
  (K of each) in backward. --cpu-chunk-mib overrides the PyTorch path's private per-chunk
  logits budget (a diagnostic: default = the kernel's own);
- ``reference``: ``bow_xent_reference``, fp32 (E, K, V) logits through autograd;
- ``gemm``: rows = E·K.
Passes, GFLOP/s, timing and the peak-memory method: benchmarks/_bench_util.py.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import add_common_args, loss_cases, resolve_device, resolve_dtype, run_bench  # noqa: E402

from llara_fast.kernels import bow_xent as bow_mod  # noqa: E402
from llara_fast.kernels.bow_xent import bow_xent  # noqa: E402
from llara_fast.kernels.reference import bow_xent_reference  # noqa: E402

_BOW_FWD_TORCH = bow_mod._bow_fwd_torch


def make_inputs(a, device: torch.device, dtype: torch.dtype) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(a.seed)
    E, K, d, V = a.examples, a.n_special, a.dim, a.vocab
    sizes = torch.randint(max(1, a.targets // 2), a.targets * 3 // 2 + 1, (E,), generator=gen)  # (E,)
    offsets = torch.zeros(E + 1, dtype=torch.int64)
    offsets[1:] = sizes.cumsum(0)  # (E+1,)
    ids = torch.randint(0, V, (int(offsets[-1]),), generator=gen)  # (nnz,)
    dgen = torch.Generator(device=device).manual_seed(a.seed)
    inp = {"hidden": torch.randn(E, K, d, generator=dgen, device=device, dtype=dtype),  # (E, K, d)
           "weight": torch.randn(V, d, generator=dgen, device=device, dtype=dtype).mul_(0.02),  # (V, d)
           "offsets": offsets.to(device), "ids": ids.to(device), "grad_logits": None}
    if a.gemm_on:
        inp["grad_logits"] = torch.randn(E * K, V, generator=dgen, device=device, dtype=dtype)  # (E·K, V)
    return inp


def make_cases(a, inp: dict):
    offsets, ids = inp["offsets"], inp["ids"]
    ops = {"ours": lambda h, w: bow_xent(h, w, offsets, ids, a.pooling, impl=a.impl)[0].sum(),
           "reference": lambda h, w: bow_xent_reference(h, w, offsets, ids, a.pooling)[0].sum()}
    flops = 2.0 * a.examples * a.n_special * a.dim * a.vocab
    return loss_cases(ops, inp["hidden"], inp["weight"], flops, inp["grad_logits"])


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--examples", type=int, default=64, help="E: examples (passages x {EBAE, EBAR} in a step)")
    p.add_argument("--n-special", type=int, default=8, help="K: special-token rows per example")
    p.add_argument("--targets", type=int, default=480, help="mean target ids per example")
    p.add_argument("--pooling", default="max", choices=["max", "mean"])
    p.add_argument("--cpu-chunk-mib", type=float, default=None,
                   help="diagnostic: override the PyTorch path's private logits budget per chunk "
                        "(default: the kernel's own, 256 MiB)")
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    a.gemm_on = a.gemm == "on" or (a.gemm == "auto" and device.type == "cuda")
    if a.cpu_chunk_mib is not None:
        bow_mod._bow_fwd_torch = functools.partial(_BOW_FWD_TORCH, budget_bytes=int(a.cpu_chunk_mib * 2**20))
    inp = make_inputs(a, device, dtype)
    cases = make_cases(a, inp)
    E, K, d, V = a.examples, a.n_special, a.dim, a.vocab

    def check() -> dict:
        args = (inp["hidden"], inp["weight"], inp["offsets"], inp["ids"], a.pooling)
        with torch.no_grad():
            loss, valid = bow_xent(*args, impl=a.impl)
            ref, ref_valid = bow_xent_reference(*args)
        assert torch.equal(valid, ref_valid)
        return {"loss_max_abs_diff": (loss - ref).abs().max().item()}

    meta = {"dtype": str(dtype).replace("torch.", ""), "impl": a.impl, "E": E, "K": K, "d": d, "V": V,
            "pooling": a.pooling, "target_ids": int(inp["ids"].numel()), "cpu_chunk_mib": a.cpu_chunk_mib}
    notes = lambda: (f"sizes: fp32 (E*K, V) logits {E * K * V * 4 / 2**20:.1f} MiB; fp32 pooled (E, V) "  # noqa: E731
                     f"{E * V * 4 / 2**20:.1f} MiB; weight (V, d) {V * d * inp['weight'].element_size() / 2**20:.1f} MiB")
    return run_bench("bow_xent", a, argv, os.path.abspath(__file__), device, cases, meta, check, notes)


if __name__ == "__main__":
    main()
