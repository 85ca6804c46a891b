"""branch_attention's kernels compile for an H100 (sm_90) with the real Triton compiler, on any
machine: the interpreter that runs them in the CPU tests accepts code the compiler refuses, and
a GPU is lent rarely. Ahead-of-time compilation needs no GPU (Triton ships ptxas); it runs in a
subprocess because TRITON_INTERPRET, which this suite sets, is read when the kernels are defined.
Each launch configuration of _blocks() is compiled and must fit the H100's shared memory."""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llara_fast.kernels import branch_attention as ba

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
FP32_PTRS, INT_PTRS = {"LSE", "DELTA"}, {"CU", "CTX0", "CTX1"}
DATA_PTRS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}

def signature(fn, dtype, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in DATA_PTRS | FP32_PTRS | INT_PTRS:
            sig[name] = "*" + ("fp32" if name in FP32_PTRS else "i32" if name in INT_PTRS else TYPES[dtype])
        else:
            sig[name] = "fp32" if name.endswith("scale") else "i32"
    return sig

target = GPUTarget("cuda", 90, 32)
for dtype, D, group in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    cfg, prec = ba._blocks(D, dtype), ba._precision(dtype)
    common = dict(GROUP=group, BLOCK_D=cfg["BLOCK_D"], PRECISION=prec)
    runs = [("fwd", ba._fwd_kernel, cfg["fwd"], {}), ("dq", ba._dq_kernel, cfg["dq"], {}),
            ("dkdv_own", ba._dkdv_kernel, cfg["dkdv"], {"CTX": False}),
            ("dkdv_ctx", ba._dkdv_kernel, cfg["dkdv"], {"CTX": True})]
    for name, fn, (bm, bn, opts), extra in runs:
        consts = dict(common, BLOCK_M=bm, BLOCK_N=bn, **extra)
        k = triton.compile(ASTSource(fn=fn, signature=signature(fn, dtype, consts), constexprs=consts),
                           target=target, options=opts)
        print(json.dumps({"kernel": name, "dtype": str(dtype), "D": D, "shared": k.metadata.shared}), flush=True)
"""

CASES = [("bfloat16", 128, 1), ("bfloat16", 64, 3), ("float32", 64, 2)]  # llama2-7b, SmolLM2, the fp32 tests


@pytest.mark.e2e  # the real compiler in a subprocess, ~25 s
def test_branch_attention_compiles_for_sm90(tmp_path):
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton build cannot compile for NVIDIA GPUs here: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a fresh compile, not a cached one
    p = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert len(rows) == 4 * len(CASES)
    for r in rows:
        assert r["shared"] <= 227 * 1024, f"{r}: over the H100's 227 KB of shared memory per block"
