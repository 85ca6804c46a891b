"""Tolerances from a rounding-error model, not from what one machine printed.

Two correct implementations of one computation differ only by rounding, and rounding depends on
the reduction order, which differs between BLAS libraries, CPUs (AVX2 / AVX-512, Intel / AMD)
and kernels. So tests either check algebra in float64 on both sides (tight), or compare an fp32
result with a float64 truth under the bound below.

A sum of n terms evaluated in a format with unit roundoff u errs by at most λ·√n·u·Σ|terms|
except with probability 2·exp(-λ²/2) (Higham & Mary, "A new approach to probabilistic rounding
error analysis", SISC 2019). LAMBDA = 8 makes that 2.5e-14 per element, small enough for a union
over the ~10^7 elements a test compares; a real defect (a wrong target, a dropped term, a wrong
mask) moves results by the size of a term, orders of magnitude above these bounds.

For a softmax cross-entropy over logits z = h @ wᵀ (the LM and bag-of-words losses), with
G = dL/dz (float64), the gradients dL/dh = G @ w and dL/dw = Gᵀ @ h carry two errors:
- their own products, sums of V (resp. rows) terms: λ·u·√V·(|G| @ |w|);
- the forward logits, sums of d terms, each off by up to δz_r = λ·u·√d·max_v(|h_r| @ |w_v|);
  softmax turns δz into a relative error of G of at most 2·δz (its own term and the
  log-sum-exp's), i.e. 2·δz_r·(|G| @ |w|).
"""
from __future__ import annotations

import math

import torch

LAMBDA = 8.0
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def unit_roundoff(dtype: torch.dtype) -> float:
    return UNIT_ROUNDOFF[dtype]


def sum_tol(n: int, magnitude, dtype: torch.dtype = torch.float32):
    """Bound on the error of a length-n sum whose terms have absolute values summing to magnitude."""
    return LAMBDA * math.sqrt(max(n, 1)) * unit_roundoff(dtype) * magnitude


def logit_error(h: torch.Tensor, w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(rows, 1) float64: bound on the error of any logit of each row of h @ wᵀ evaluated in dtype."""
    h, w = h.double().reshape(-1, h.shape[-1]), w.double()
    mag = (h.abs() @ w.abs().t()).max(dim=1, keepdim=True).values  # (rows, 1)
    return sum_tol(h.shape[-1], mag, dtype)


def xent_grad_tol(h: torch.Tensor, w: torch.Tensor, G: torch.Tensor, dtype: torch.dtype = torch.float32):
    """(tol for dL/dh (rows, d), tol for dL/dw (V, d)) of a softmax-CE-type loss over z = h @ wᵀ,
    evaluated in dtype, given the float64 logit gradient G (rows, V); see the module docstring."""
    h, w, G = h.double().reshape(-1, h.shape[-1]), w.double(), G.double().reshape(-1, w.shape[0])
    absG, dz = G.abs(), logit_error(h, w, dtype)  # (rows, V), (rows, 1)
    gw = absG @ w.abs()  # (rows, d)
    tol_h = sum_tol(w.shape[0], gw, dtype) + 2.0 * dz * gw  # (rows, d)
    tol_w = sum_tol(h.shape[0], absG.t() @ h.abs(), dtype) + 2.0 * (absG * dz).t() @ h.abs()  # (V, d)
    return tol_h, tol_w


def xent_loss_tol(h: torch.Tensor, w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(rows,) bound on the error of one row's log-sum-exp minus a logit: the logits' error twice
    plus the V-term sum of the log-sum-exp."""
    return 2.0 * logit_error(h, w, dtype).squeeze(1) + sum_tol(w.shape[0], 1.0, dtype)


def assert_within(got: torch.Tensor, want: torch.Tensor, tol, what: str = "") -> None:
    """|got - want| <= tol elementwise (tol a tensor broadcastable to want, or a number)."""
    got, want = got.double(), want.double()
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(want)
    err = (got - want).abs()
    bad = ~(err <= tol)
    if bad.any():
        i = int((err - tol).flatten().argmax())
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements outside the rounding bound; "
                             f"worst at flat index {i}: got {got.flatten()[i].item():.9g}, want "
                             f"{want.flatten()[i].item():.9g}, |err| {err.flatten()[i].item():.3g} > tol "
                             f"{tol.flatten()[i].item():.3g}")
