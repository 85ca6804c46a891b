"""linear_xent (fused LM-head projection + next-token CE, DESIGN §5) against the
materialised-logits reference: time and peak memory, forward and forward+backward.

    python benchmarks/bench_linear_xent.py [--device auto] [--dtype auto] [--vocab 49168] [--dim 576]
                                           [--tokens 1024] [--chunk-rows N] [--iters N] [--warmup N]
                                           [--gemm auto|on|off] [--impl auto] [--libs auto|on|off]

Shapes: hidden (M, d) at the M text positions (--tokens), weight (V, d), uniform random targets.
- ``ours``: ``linear_xent(..., chunk_rows, impl)``; auto = GEMMs + the Triton row kernel on
  CUDA, GEMMs + the PyTorch row pass on CPU; --chunk-rows default = the kernel's
  (``default_chunk_rows(V, M, device)``: the fewest equal chunks whose fp32 logits stay under
  ``CHUNK_BUDGET_BYTES``, 1 GiB on CUDA, 256 MiB on CPU). With grad, ours does
  all three GEMMs per chunk in its forward and only scales the stored gradients in backward;
  without, it skips the two gradient GEMMs;
- ``reference``: ``linear_xent_reference``, fp32 (M, V) logits and F.cross_entropy through
  autograd;
- ``liger`` / ``cce`` (--libs; auto: on CUDA when installed): Liger-Kernel's
  ``liger_fused_linear_cross_entropy`` and Apple's cut-cross-entropy ``linear_cross_entropy``
  (mean over the rows, no ignore index hit), the best public fused implementations, at the same shapes;
- ``gemm``: rows = M.
Passes, GFLOP/s, timing and the peak-memory method: benchmarks/_bench_util.py.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import add_common_args, loss_cases, resolve_device, resolve_dtype, run_bench  # noqa: E402

from llara_fast.kernels.linear_xent import default_chunk_rows, linear_xent  # noqa: E402
from llara_fast.kernels.reference import linear_xent_reference  # noqa: E402

try:  # optional: the public fused implementations beside ours (GPU, Triton)
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
except ImportError:
    liger_fused_linear_cross_entropy = None
try:
    from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy
except ImportError:
    cce_linear_cross_entropy = None


def make_inputs(a, device: torch.device, dtype: torch.dtype) -> dict:
    M, d, V = a.tokens, a.dim, a.vocab
    dgen = torch.Generator(device=device).manual_seed(a.seed)
    inp = {"hidden": torch.randn(M, d, generator=dgen, device=device, dtype=dtype),  # (M, d)
           "weight": torch.randn(V, d, generator=dgen, device=device, dtype=dtype).mul_(0.02),  # (V, d)
           "targets": torch.randint(0, V, (M,), generator=dgen, device=device), "grad_logits": None}  # (M,)
    if a.gemm_on:
        inp["grad_logits"] = torch.randn(M, V, generator=dgen, device=device, dtype=dtype)  # (M, V)
    return inp


def library_ops(a, inp: dict) -> dict:
    """The public libraries' ops that are installed and asked for."""
    y, ops = inp["targets"], {}
    if a.libs_on and liger_fused_linear_cross_entropy is not None:
        ops["liger"] = lambda h, w: liger_fused_linear_cross_entropy(h, w, y)
    if a.libs_on and cce_linear_cross_entropy is not None:
        ops["cce"] = lambda h, w: cce_linear_cross_entropy(h, w, y)
    return ops


def make_cases(a, inp: dict):
    y = inp["targets"]
    ops = {"ours": lambda h, w: linear_xent(h, w, y, a.chunk_rows, impl=a.impl),
           "reference": lambda h, w: linear_xent_reference(h, w, y), **library_ops(a, inp)}
    return loss_cases(ops, inp["hidden"], inp["weight"], 2.0 * a.tokens * a.dim * a.vocab, inp["grad_logits"])


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--tokens", type=int, default=1024, help="M: text positions the LM head is applied at")
    p.add_argument("--chunk-rows", type=int, default=None, help="ours: rows per chunk (default: the kernel's)")
    p.add_argument("--libs", default="auto", choices=["auto", "on", "off"],
                   help="also time Liger-Kernel's and cut-cross-entropy's fused linear CE (auto: on CUDA, if installed)")
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    a.libs_on = a.libs == "on" or (a.libs == "auto" and device.type == "cuda")
    dtype = resolve_dtype(a.dtype, device)
    a.gemm_on = a.gemm == "on" or (a.gemm == "auto" and device.type == "cuda")
    inp = make_inputs(a, device, dtype)
    cases = make_cases(a, inp)
    M, d, V = a.tokens, a.dim, a.vocab
    rows = min(a.chunk_rows or default_chunk_rows(V, M, device.type), M)

    def check() -> dict:
        with torch.no_grad():
            loss = linear_xent(inp["hidden"], inp["weight"], inp["targets"], a.chunk_rows, impl=a.impl)
            ref = linear_xent_reference(inp["hidden"], inp["weight"], inp["targets"])
            out = {"loss_abs_diff": (loss - ref).abs().item()}
            for name, op in library_ops(a, inp).items():
                out[f"loss_abs_diff_{name}"] = (op(inp["hidden"], inp["weight"]).float() - ref).abs().item()
        return out

    meta = {"dtype": str(dtype).replace("torch.", ""), "impl": a.impl, "M": M, "d": d, "V": V,
            "chunk_rows": rows, "chunk_rows_default": a.chunk_rows is None,
            "libs": {"liger": liger_fused_linear_cross_entropy is not None and a.libs_on,
                     "cce": cce_linear_cross_entropy is not None and a.libs_on}}
    notes = lambda: (f"sizes: fp32 (M, V) logits {M * V * 4 / 2**20:.1f} MiB; one chunk of fp32 logits "  # noqa: E731
                     f"{rows * V * 4 / 2**20:.1f} MiB ({rows} rows); weight (V, d) "
                     f"{V * d * inp['weight'].element_size() / 2**20:.1f} MiB")
    return run_bench("linear_xent", a, argv, os.path.abspath(__file__), device, cases, meta, check, notes)


if __name__ == "__main__":
    main()
