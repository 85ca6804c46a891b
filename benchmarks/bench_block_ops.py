"""The elementwise ops of a block, RMSNorm, RoPE and SwiGLU's gate, as the model runs them
(eager), compiled, and Liger-Kernel's Triton kernels beside them: time and peak memory, forward
and forward+backward, at one micro-batch of a model's shape. It says whether fused kernels of our
own are worth writing: only where compile leaves these ops slow (issue #15).

    python benchmarks/bench_block_ops.py [--device auto] [--dtype auto] [--tokens 16384] [--dim 4096]
        [--ffn 11008] [--heads 32] [--kv-heads 32] [--head-dim 128] [--ops rmsnorm,rope,swiglu]
        [--impls eager,compile,liger] [--iters N] [--warmup N] [--no-memory]

- ``eager``: llara_fast.model's own code: RMSNorm (fp32 inside, LLaMA's casting), apply_rope
  (rotate-half over q (N, H, D) and k (N, KV, D), cos/sin (N, D)), silu(gate) * up;
- ``compile``: the same functions under torch.compile (inductor fuses each into one or two kernels);
- ``liger``: liger_rms_norm (casting "llama"), liger_rope (q, k viewed as (1, H, N, D): it makes
  them contiguous, a copy our layout pays), liger_swiglu; when Liger-Kernel is installed and the
  device is CUDA (pretrain_gpu.sh stage puts its wheel in .bench_assets/wheels).
Ratios are against eager. The ops are memory-bound: the GFLOP/s column is left at 0. Timing
and peak memory: benchmarks/_bench_util.py.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import Case, add_run_args, resolve_device, resolve_dtype, run_bench  # noqa: E402

from llara_fast.model import RMSNorm, apply_rope  # noqa: E402

try:  # optional: Liger-Kernel's Triton kernels (GPU)
    from liger_kernel.transformers.functional import liger_rms_norm, liger_rope, liger_swiglu
except ImportError:
    liger_rms_norm = liger_rope = liger_swiglu = None

EPS = 1e-5


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up  # (N, ffn), as FeedForward computes it


def rope_qk(q, k, cos, sin):
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def liger_rope_qk(q, k, cos, sin):
    oq, ok = liger_rope(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])  # (1, H|KV, N, D)
    return oq[0].transpose(0, 1), ok[0].transpose(0, 1)  # (N, H, D), (N, KV, D)


def make_ops(a, device, dtype):
    """{op: (inputs that take gradients, {impl: fn(*inputs) -> tensor or tuple}, parameters the
    fns hold: their gradients are part of the backward and are cleared between calls)}."""
    gen = torch.Generator(device=device).manual_seed(a.seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)  # noqa: E731
    N = a.tokens
    norm = RMSNorm(a.dim, EPS).to(device, dtype)
    angles = torch.arange(N, device=device, dtype=torch.float32)[:, None] * torch.rand(
        a.head_dim // 2, generator=gen, device=device)[None, :]  # (N, D/2)
    emb = torch.cat((angles, angles), dim=-1)  # (N, D)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    ops = {
        "rmsnorm": ([rnd(N, a.dim)], {"eager": norm, "liger": (lambda x: liger_rms_norm(x, norm.weight, EPS))
                                      if liger_rms_norm else None}, [norm.weight]),
        "rope": ([rnd(N, a.heads, a.head_dim), rnd(N, a.kv_heads, a.head_dim)],
                 {"eager": lambda q, k: rope_qk(q, k, cos, sin),
                  "liger": (lambda q, k: liger_rope_qk(q, k, cos, sin)) if liger_rope else None}, []),
        "swiglu": ([rnd(N, a.ffn), rnd(N, a.ffn)], {"eager": swiglu, "liger": liger_swiglu}, []),
    }
    for _, impls, _ in ops.values():
        impls["compile"] = torch.compile(impls["eager"])
    return ops


def make_cases(a, ops, impls) -> list[Case]:
    cases = []
    for op in a.ops.split(","):
        inputs, fns, params = ops[op]
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        grads = sum(t.numel() * t.element_size() for t in inputs + params)
        with torch.no_grad():
            outs = fns["eager"](*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        g_out = [torch.randn_like(o) for o in outs]

        def reset(leaves=leaves + params):
            for t in leaves:
                t.grad = None

        for impl in impls:
            fn = fns.get(impl)
            if fn is None:
                continue

            def fwd(fn=fn, inputs=inputs):
                with torch.no_grad():
                    return fn(*inputs)

            def fwd_bwd(fn=fn, leaves=leaves, g_out=g_out):
                out = fn(*leaves)
                out = out if isinstance(out, tuple) else (out,)
                torch.autograd.backward(out, g_out)
                return [o.detach() for o in out]

            cases += [Case(f"{op}/{impl}:fwd", f"{op}/{impl}", "fwd", fwd, 0.0),
                      Case(f"{op}/{impl}:fwd+bwd", f"{op}/{impl}", "fwd+bwd", fwd_bwd, 0.0, reset, grads)]
    return cases


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p)
    p.add_argument("--tokens", type=int, default=16384, help="N: tokens of one micro-batch (pretrain's GPU budget)")
    p.add_argument("--dim", type=int, default=4096, help="hidden size (4096 = llama2-7b, 576 = SmolLM2-135M)")
    p.add_argument("--ffn", type=int, default=11008, help="SwiGLU hidden size")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--ops", default="rmsnorm,rope,swiglu")
    p.add_argument("--impls", default="eager,compile,liger", help="liger runs on CUDA only, when installed")
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    impls = [i for i in a.impls.split(",") if i and (i != "liger" or device.type == "cuda")]
    ops = make_ops(a, device, dtype)
    cases = make_cases(a, ops, impls)
    if a.warmup is None:  # compile's first calls compile: never time them
        a.warmup = 3 if device.type == "cuda" else 2

    def check() -> dict:
        """max |impl - eager| of each op's outputs, in the compute dtype."""
        out = {}
        for op in a.ops.split(","):
            inputs, fns, _ = ops[op]
            with torch.no_grad():
                want = fns["eager"](*inputs)
                want = want if isinstance(want, tuple) else (want,)
                for impl in impls:
                    if impl != "eager" and fns.get(impl) is not None:
                        got = fns[impl](*inputs)
                        got = got if isinstance(got, tuple) else (got,)
                        out[f"max_abs_diff_{op}_{impl}"] = max((g.float() - w.float()).abs().max().item()
                                                               for g, w in zip(got, want))
        return out

    meta = {"dtype": str(dtype).replace("torch.", ""), "N": a.tokens, "dim": a.dim, "ffn": a.ffn, "H": a.heads,
            "KV": a.kv_heads, "D": a.head_dim, "impls": impls, "liger": liger_rms_norm is not None}
    return run_bench("block_ops", a, argv, os.path.abspath(__file__), device, cases, meta, check,
                     ref_impl=lambda impl: impl.split("/")[0] + "/eager")


if __name__ == "__main__":
    main()
