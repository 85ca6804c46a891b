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


def attention_tols(q, k, v, mask, do, dtype: torch.dtype = torch.float32):
    """Bounds on the errors of masked softmax attention evaluated in dtype (fp32 accumulation,
    online softmax) and of its gradients, elementwise: (tol out (N, H, D), tol dq, tol dk, tol dv).

    q (N, H, D), k, v (N, KV, D), mask (N, N) bool, do (N, H, D); computed in float64 from the
    magnitudes of the terms, as in the module docstring:
    - a score s_ij = q_i·k_j/√D errs by δs_i = λu√D·max_j |q_i|·|k_j|/√D (plus the scaling's
      rounding); the probabilities p_ij (after normalising over n_i keys) then by a relative
      e_i = 2·δs_i + λu(√n_i + 4);
    - out_i = Σ_j p_ij v_j: e_i·(|P| @ |V|) plus its own n_i-term sum;
    - dV = Pᵀ dO, dP = dO Vᵀ, δ_i = dO_i·out_i, dS = P ∘ (dP - δ), dQ = dS K/√D, dK = dSᵀ Q/√D:
      each product's own sum bound plus its inputs' errors carried through |·|."""
    q, k, v, do = (t.detach().cpu().double() for t in (q, k, v, do))
    H, KV, D = q.shape[1], k.shape[1], q.shape[2]
    G = H // KV
    u = unit_roundoff(dtype)
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # (N, H, D)
    m = mask.cpu()[None]  # (1, N, N)
    s = torch.einsum("ihd,jhd->hij", q, kr) / math.sqrt(D)  # (H, N, N)
    p = s.masked_fill(~m, float("-inf")).softmax(-1)  # (H, N, N)
    mag_s = torch.einsum("ihd,jhd->hij", q.abs(), kr.abs()) / math.sqrt(D)  # (H, N, N)
    n_keys = m.sum(-1, keepdim=True).double()  # (1, N, 1)
    ds_err = LAMBDA * u * math.sqrt(D) * mag_s.masked_fill(~m, 0).amax(-1, keepdim=True)  # (H, N, 1)
    ds_err = ds_err + 4 * u * s.abs().masked_fill(~m, 0).amax(-1, keepdim=True)
    e = 2 * ds_err + LAMBDA * u * (n_keys.sqrt() + 4)  # (H, N, 1) relative error of p
    out = torch.einsum("hij,jhd->ihd", p, vr)  # (N, H, D)
    pv = torch.einsum("hij,jhd->ihd", p, vr.abs())  # (N, H, D)
    e_nhd = e.permute(1, 0, 2)  # (N, H, 1)
    tol_o = (e_nhd + LAMBDA * u * n_keys[0].sqrt()[:, None]) * pv  # (N, H, D)
    n_q = m.sum(-2).double()[0]  # (N,) queries per key
    # dV_j = Σ_i p_ij dO_i, summed over the G heads of a kv head
    pdo = torch.einsum("hij,ihd->jhd", p, do.abs())  # (N, H, D)
    tol_dv = torch.einsum("hij,ihd->jhd", p * e, do.abs()) + LAMBDA * u * (n_q * G).sqrt()[:, None, None] * pdo
    tol_dv = tol_dv.reshape(-1, KV, G, D).sum(2)  # (N, KV, D)
    dp = torch.einsum("ihd,jhd->hij", do, vr)  # (H, N, N)
    dp_err = LAMBDA * u * math.sqrt(D) * torch.einsum("ihd,jhd->hij", do.abs(), vr.abs())  # (H, N, N)
    delta = (do * out).sum(-1).t()[:, :, None]  # (H, N, 1)
    delta_err = (LAMBDA * u * math.sqrt(D) * (do.abs() * out.abs()).sum(-1)
                 + (do.abs() * tol_o).sum(-1)).t()[:, :, None]  # (H, N, 1)
    dS = p * (dp - delta)  # (H, N, N)
    dS_err = p * (dp_err + delta_err) + e * (p * (dp - delta).abs())  # (H, N, N)
    absdS = dS.abs() + dS_err
    tol_dq = (LAMBDA * u * n_keys[0].sqrt()[:, None] * torch.einsum("hij,jhd->ihd", dS.abs(), kr.abs())
              + torch.einsum("hij,jhd->ihd", dS_err, kr.abs())) / math.sqrt(D)  # (N, H, D)
    tol_dk = (LAMBDA * u * (n_q * G).sqrt()[:, None, None] * torch.einsum("hij,ihd->jhd", absdS, q.abs())
              + torch.einsum("hij,ihd->jhd", dS_err, q.abs())) / math.sqrt(D)  # (N, H, D)
    tol_dk = tol_dk.reshape(-1, KV, G, D).sum(2)  # (N, KV, D)
    return tol_o, tol_dq, tol_dk, tol_dv
