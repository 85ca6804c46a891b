"""Triton kernels, one op per file, each with a PyTorch reference in reference.py.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (set before these
modules are imported); the losses then default to each op's chunked PyTorch path.
"""
import torch


def use_triton(device: torch.device, impl: str, dtype: torch.dtype | None = None) -> bool:
    """impl "auto": Triton on CUDA, the chunked PyTorch path elsewhere and for float64 (the
    kernels take fp32 / fp16 / bf16); "triton" forces the kernels (on CPU that needs
    TRITON_INTERPRET=1); "torch" forces the PyTorch path."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    return impl == "triton" or (impl == "auto" and device.type == "cuda" and dtype != torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the losses accumulate and return in: fp32 for fp32 / fp16 / bf16 inputs, float64
    for float64 ones (fp32 at least)."""
    return torch.promote_types(dtype, torch.float32)


def check_dtypes(op: str, a: torch.Tensor, b: torch.Tensor, triton: bool) -> None:
    """a and b share a float dtype the chosen path takes: fp32 / fp16 / bf16, or float64 on the
    PyTorch path (the Triton kernels accumulate in fp32)."""
    ok = (torch.float32, torch.float16, torch.bfloat16) + (() if triton else (torch.float64,))
    if a.dtype != b.dtype or a.dtype not in ok:
        what = "fp32/fp16/bf16 (the Triton kernels)" if triton else "fp32/fp16/bf16/float64"
        raise TypeError(f"{op}: hidden and weight must share a float dtype ({what}), got {a.dtype} and {b.dtype}")


def accumulate_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool = False) -> None:
    """acc += a @ b with acc fp32 (acc = a @ b when ``first``: acc may then be uninitialised, which
    spares zero-filling a (V, d) gradient): in place when the inputs are fp32 (no (V, d)
    temporary), else one temporary in the inputs' dtype, added into acc without a further fp32 copy."""
    if a.dtype == acc.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
    elif first:
        acc.copy_(a @ b)
    else:
        acc.add_(a @ b)
