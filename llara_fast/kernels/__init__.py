"""Triton kernels, one op per file, each with a PyTorch reference in reference.py.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (set before these
modules are imported); the losses then default to each op's chunked PyTorch path.
"""
import torch


def use_triton(device: torch.device, impl: str) -> bool:
    """impl "auto": Triton on CUDA, the chunked PyTorch path elsewhere; "triton" forces the
    kernels (on CPU that needs TRITON_INTERPRET=1); "torch" forces the PyTorch path."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    return impl == "triton" or (impl == "auto" and device.type == "cuda")


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
