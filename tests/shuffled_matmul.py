"""A test-only matrix product that sums its inner dimension in a shuffled, blocked order.

    LLARA_TEST_MATMUL=shuffled python -m pytest tests/...    (conftest installs it)

Every fp32 / half matmul that goes through torch.matmul, `@`, torch.mm (out= too), Tensor.addmm_
and F.linear is computed as a sum of partial products over blocks of the inner dimension of random
sizes, added in a random order (fixed per inner size), each partial product by the original kernel. The result is a
correct product with another rounding, as a different BLAS, CPU or thread count would give; the
worst-case bounds of tests/errmodel.py must hold for it as for any other order
(scripts/numerics_matrix.sh runs the numerics tests under it). float64 products (the algebra
checks) are shuffled too: their bounds hold for any order as well.
"""
from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F

_orig = {}


def _blocks(n: int) -> list[tuple[int, int]]:
    """Random consecutive blocks of [0, n), in a random order: random, but fixed for a given inner
    size, as a library's order is fixed for its kernel (so the suite's bit-for-bit checks of one
    computation done twice, or of rows that must not depend on other rows, still apply)."""
    gen = torch.Generator().manual_seed(20261207 + n)
    cuts = sorted({0, n, *torch.randint(1, max(n, 2), (min(n, 7),), generator=gen).tolist()})
    cuts = [c for c in cuts if 0 <= c <= n]
    blocks = [(a, b) for a, b in pairwise(cuts) if b > a]
    order = torch.randperm(len(blocks), generator=gen).tolist()
    return [blocks[i] for i in order]


def _shuffled(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mm = _orig.get("matmul", torch.matmul)  # the library's product (also before install())
    if a.dim() < 2 or b.dim() < 2 or not a.is_floating_point() or a.shape[-1] < 2:
        return mm(a, b)
    out = None
    for lo, hi in _blocks(a.shape[-1]):
        part = mm(a[..., lo:hi], b[..., lo:hi, :])
        out = part if out is None else out + part  # the blocks' sum in the storage dtype, a random order
    return out


def _matmul(a, b, *, out=None):
    r = _shuffled(a, b)
    return r if out is None else out.copy_(r)


def _mm(a, b, *, out=None):
    return _matmul(a, b, out=out)


def _addmm_(self, a, b, *, beta=1, alpha=1):
    r = _shuffled(a, b)
    return self.mul_(beta).add_(r, alpha=alpha) if beta != 1 else self.add_(r, alpha=alpha)


def _linear(x, w, bias=None):
    r = _shuffled(x, w.t())
    return r if bias is None else r + bias


def install() -> None:
    if _orig:
        return
    _orig.update(matmul=torch.matmul, mm=torch.mm, dunder=torch.Tensor.__matmul__, method=torch.Tensor.matmul,
                 addmm_=torch.Tensor.addmm_, linear=F.linear)
    torch.matmul = _matmul
    torch.mm = _mm
    torch.Tensor.__matmul__ = lambda self, other: _shuffled(self, other)
    torch.Tensor.matmul = lambda self, other: _shuffled(self, other)
    torch.Tensor.addmm_ = _addmm_
    F.linear = _linear
