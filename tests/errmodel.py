"""Tolerances from a worst-case rounding-error model, never from what one machine printed.

Two correct implementations of one computation differ only by rounding, and rounding depends on
the reduction order, which differs between BLAS libraries, CPUs (AVX2 / AVX-512, Intel / AMD),
thread counts and kernels. So tests either check algebra in float64 on both sides (ALGEBRA_RTOL
below), or compare a low-precision result with a float64 truth under the bounds below, which hold
for ANY order of evaluation.

The bounds (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., §2-3), u the unit
roundoff of the format the arithmetic runs in (fp32 accumulation for fp16 / bf16 inputs too: the
Triton kernels accumulate in fp32, and PyTorch's CPU GEMM for half formats accumulates in float,
its opmath type), γ_n = n·u / (1 - n·u):

- SUM: a sum of n terms, evaluated in any order (serial, pairwise, blocked, split over threads,
  with or without FMA) errs by at most γ_(n-1)·Σ|terms| (Higham eq. 3.5 holds for every order,
  since each term passes through at most n-1 roundings); a dot product of length n, with the
  products rounded too, by γ_n·(|a|·|b|) (eq. 3.4). `sum_tol(n, magnitude)` is γ_n·magnitude.
- LOGITS: z = h @ wᵀ; each logit errs by at most γ_d·(|h_r|·|w_v|) ≤ dz_r := γ_d·max_v |h_r|·|w_v|
  (`logit_error`).
- SOFTMAX: p_v = exp(z_v - lse). With every logit off by at most dz, lse moves by at most dz (it
  is 1-Lipschitz in the max norm); evaluating it (subtracting the max, exp, a V-term sum, log, adding
  the max back) adds γ_(V+8) relative to the sum and EXP_ULPS·u·(|lse| + max|z|) absolute; each
  computed exponent z_v - lse is then off by at most 2·dz + that, and exp (relative EXP_ULPS·u)
  turns an absolute exponent error δ into a relative error expm1(δ) of p_v. `softmax_rel_error`
  is that relative error e_r of every probability of a row. EXP_ULPS = 8 covers the libm / SLEEF /
  Triton exp and log implementations (each documented within 1-4 ulp) and the divisions and
  scalings of the online softmax, with margin.
- CE GRADIENT: G = c·(p - y) for a softmax cross-entropy (y ≥ 0 the target weights, c the row's
  weight). Its error is at most e_r·P + 4u·|G|, where P = c·p ≥ 0 is the softmax part (NOT e·|G|:
  where p ≈ 1 at the target, G cancels and |G| ≪ P). So tests pass both the float64 G and its
  softmax part P (`xent_grad_tol`).
- PRODUCTS of such inputs: dL/dh = G @ w, dL/dw = Gᵀ @ h: γ_n·(|G| @ |w|) for their own sums plus
  (1 + γ_n)·(δG @ |w|) for the inputs' errors.
- MAX POOLING: z_e = max_k z_ek routes each column's gradient to the row that won. When two rows'
  logits for a column are within their rounding errors (2·dz) of each other, the fp32 winner may
  differ from the float64 winner on some CPU — a discrete change by |g_v|·|w_v| in each of the two
  rows' dL/dh and by |g_v|·|h_r1 - h_r2| in dL/dw_v. `max_tie_tol` adds exactly that, for the near
  ties only (every other column must be routed as in float64).
- HALF STORAGE: where a format stores values between the fp32 operations (fp16 / bf16 logits, G,
  outputs), each stored value adds its own relative u_storage plus, below the normal range, an
  absolute UNDERFLOW (`storage=` arguments). An output may be rounded to the half format twice:
  as partial products (a half GEMM per chunk or per pooled row, at most one per row summed) and
  as the final cast of the fp32 accumulator.
- ATTENTION: the same rules applied to softmax attention (`attention_tols`). With grouped-query
  heads and half storage, each query head's dK / dV may be a stored partial and the G partials summed
  in the half format (sdpa's backward through expanded K, V does): us + γ_(G-1) of the half format
  on their magnitude.
- EMBEDDINGS: a unit vector computed in float64 and rounded to fp32 once at the end (the Encoder)
  is within half an fp32 ulp of its float64 value, so two of them whose float64 values agree to
  ALGEBRA_RTOL differ by at most one ulp: EMB_ATOL = 2^-24 for entries in [-1, 1]. Where the pooling
  itself runs in fp32 on float64 states (the model card's `.float().mean(1)`, then normalize),
  `pooled_unit_tol` bounds the result.

TRAINING RUNS compared across process counts (1 process vs 2 with FSDP2 and negatives gathered
across ranks, GradCache vs one piece, ours vs the benchmark's reference) run the same algebra in
another order: the gradient all-reduce groups the ranks' shares differently, GEMMs see other shapes.
Both sides run with `--run.dtype float64`. Each reduction then errs by γ_n·Σ|terms| with u = 2^-53,
and AdamW's update m/(√v + eps) passes a gradient difference δ on as at most lr·δ/eps per element
(as the relative δ/|g| where |g| ≫ eps); with eps = 1e-8 that is ≤ lr·n·1.1e-8·Σ|terms|, reached only
where the gradient cancels to ~eps, whose first-order effect on the loss is |g|·Δw ≤ eps·Δw. After a
few steps the logged loss, its parts and the gradient norm agree to ~1e-13 (1e-15 measured):
ALGEBRA_RTOL. In fp32 (u = 2^-24) δ can exceed eps and flip a weight's whole lr-sized step, so no
order-free bound exists: these comparisons are never made in fp32. A real defect (negatives not
shared across ranks, a gradient averaged wrongly even by 1e-6, a dropped negative) moves the loss or
the gradient norm by ≥ 1e-6 relative, and the tests keep a negative check (cross_rank false changes
the loss by > 1e-3).

The float64 truth itself errs by the same bounds with u = 2^-53, 2^29 times less: it is ignored.
A real defect moves a result by the size of a term — a 1% error in a target weight, a dropped
vocabulary column, a dropped key, a wrong mask — and the tests check that each of these falls
outside these bounds (tests/kernels/*, test_llara.py).
"""
from __future__ import annotations

import math

import torch

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# half the spacing of the subnormals: the absolute error of storing a value below the normal range
UNDERFLOW = {torch.float64: 2.0**-1075, torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}
EXP_ULPS = 8
# Algebra checks run both sides in float64: a few hundred roundings of 2^-53 on a chain of ~100
# operations stay below 1e-12 relative of the largest value (γ_n for n up to 10^4, times the
# depth); a wrong mask, position, weight or formula moves results by >= 1e-4. 1e-10 sits between.
ALGEBRA_RTOL = 1e-10
EMB_ATOL = 2.0**-24  # see EMBEDDINGS


def unit_roundoff(dtype: torch.dtype) -> float:
    return UNIT_ROUNDOFF[dtype]


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """γ_n = n·u / (1 - n·u): the worst-case relative error of n roundings (Higham Lemma 3.1)."""
    nu = max(n, 1) * unit_roundoff(dtype)
    if nu >= 0.5:
        raise ValueError(f"gamma({n}) in {dtype}: n·u = {nu} makes the bound vacuous")
    return nu / (1.0 - nu)


def sum_tol(n: int, magnitude, dtype: torch.dtype = torch.float32):
    """Worst-case error of a length-n sum or dot product, any order, whose terms have absolute
    values summing to `magnitude`."""
    return gamma(n, dtype) * magnitude


def logit_error(h: torch.Tensor, w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(rows, 1) float64: bound on the error of every logit of each row of h @ wᵀ evaluated in dtype."""
    h, w = h.double().reshape(-1, h.shape[-1]), w.double()
    mag = (h.abs() @ w.abs().t()).amax(dim=1, keepdim=True)  # (rows, 1)
    return sum_tol(h.shape[-1], mag, dtype)


def lse_error(z: torch.Tensor, dz: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(rows, 1): bound on the error of a row's log-sum-exp evaluated in dtype from logits z
    (rows, V, float64 truth) that are each off by at most dz (rows, 1)."""
    z = z.double()
    u = unit_roundoff(dtype)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (rows, 1)
    zmax = z.abs().amax(dim=-1, keepdim=True)  # (rows, 1)
    return dz + gamma(z.shape[-1] + 8, dtype) + EXP_ULPS * u * (lse.abs() + zmax)


def softmax_rel_error(z: torch.Tensor, dz: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(rows, 1): bound on the relative error of every computed probability of a row (see SOFTMAX)."""
    u = unit_roundoff(dtype)
    zmax = z.double().abs().amax(dim=-1, keepdim=True)
    lse = torch.logsumexp(z.double(), dim=-1, keepdim=True)
    delta = dz + lse_error(z, dz, dtype) + u * (zmax + lse.abs()) + EXP_ULPS * u  # (rows, 1) exponent error
    return torch.expm1(delta)


def xent_grad_tol(h: torch.Tensor, w: torch.Tensor, G: torch.Tensor, P: torch.Tensor, e: torch.Tensor,
                  dtype: torch.dtype = torch.float32, storage: torch.dtype | None = None, n_rows: int | None = None):
    """(tol for dL/dh (rows, d), tol for dL/dw (V, d)) of a softmax-CE-type loss over z = h @ wᵀ.

    G (rows, V) float64 dL/dz, P (rows, V) its softmax part (≥ 0), e (rows, 1) the relative error
    of each row's probabilities (`softmax_rel_error`, of the pooled row for pooled losses); n_rows
    the number of terms of dL/dw's sum if more rows than these are summed into it (default rows).
    storage: the half format G and the outputs are stored in, if any (see HALF STORAGE)."""
    h, w = h.double().reshape(-1, h.shape[-1]), w.double()
    G, P = G.double().reshape(-1, w.shape[0]), P.double().reshape(-1, w.shape[0])
    u = unit_roundoff(dtype)
    us = unit_roundoff(storage) if storage is not None else 0.0
    eta = UNDERFLOW[storage] if storage is not None else 0.0
    absG = G.abs()
    dG = e * P + (4 * u + us) * absG + eta  # (rows, V) error of the computed (and stored) dL/dz
    n_rows = n_rows or h.shape[0]
    gw, gh = absG @ w.abs(), absG.t() @ h.abs()  # (rows, d), (V, d)
    tol_h = gamma(w.shape[0], dtype) * gw + (1 + gamma(w.shape[0], dtype)) * (dG @ w.abs())
    tol_w = gamma(n_rows, dtype) * gh + (1 + gamma(n_rows, dtype)) * (dG.t() @ h.abs())
    if storage is not None:  # the stored outputs' own roundings: partial products, then the final cast
        tol_h = tol_h + 2 * us * (1 + us) * (gw + tol_h) + 2 * eta
        tol_w = tol_w + 2 * us * (1 + us) * (gh + tol_w) + (n_rows + 1) * eta
    return tol_h, tol_w


def max_tie_tol(h: torch.Tensor, w: torch.Tensor, z: torch.Tensor, g: torch.Tensor, dz: torch.Tensor):
    """Extra tolerance for max pooling's near ties (see MAX POOLING): (tol_h (E, K, d), tol_w (V, d)).

    h (E, K, d) the pooled rows, w (V, d), z (E, K, V) their float64 logits, g (E, V) a bound on
    |dL/dz_pooled| (the float64 gradient plus its error), dz (E, K, 1) each row's logit error bound.
    A row k is a candidate winner of column v when z_ekv ≥ max_k z_ekv - (dz_ek + dz_e,argmax)."""
    h, w, z, g = h.double(), w.double(), z.double(), g.double().abs()
    top, arg = z.max(dim=1)  # (E, V)
    dz_top = torch.gather(dz.expand_as(z), 1, arg[:, None, :]).squeeze(1)  # (E, V)
    cand = z >= (top - dz_top)[:, None, :] - dz  # (E, K, V) includes the winner
    tied = cand.sum(1) > 1  # (E, V)
    a = (cand & tied[:, None, :]).double() * g[:, None, :]  # (E, K, V)
    tol_h = a @ w.abs()  # (E, K, d)
    # |h_ek - h_e,winner(v)| ≤ |h_ek| + |h_e,winner(v)| ≤ |h_ek| + max_k |h_ek|
    hmax = h.abs().amax(1, keepdim=True)  # (E, 1, d)
    tol_w = torch.einsum("ekv,ekd->vd", a, h.abs() + hmax)  # (V, d)
    return tol_h, tol_w


def logit_error_stored(h, w, dtype=torch.float32, storage=None) -> torch.Tensor:
    """logit_error plus, where logits are stored in a half format, that storage's rounding of the
    row's largest logit."""
    dz = logit_error(h, w, dtype)
    if storage is None:
        return dz
    mag = (h.double().reshape(-1, h.shape[-1]).abs() @ w.double().abs().t()).amax(dim=1, keepdim=True)
    return dz + unit_roundoff(storage) * (mag + dz)


def xent_loss_tol(z: torch.Tensor, dz: torch.Tensor, n_targets: int, dtype=torch.float32) -> torch.Tensor:
    """(rows,): bound on a row's lse(z) - mean of n_targets of its logits (a CE: n_targets = 1):
    the log-sum-exp's error, the targets' logit errors (dz) and their mean, and the subtraction."""
    z = z.double()
    u = unit_roundoff(dtype)
    zmax = z.abs().amax(dim=-1, keepdim=True)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    tol = lse_error(z, dz, dtype) + dz + gamma(n_targets + 1, dtype) * zmax + u * (lse.abs() + zmax)
    return tol.squeeze(-1)


def bow_tols(h, w, z, G, pooling: str, g_rows: torch.Tensor, dtype=torch.float32, storage=None,
             n_rows: int | None = None):
    """Tolerances of a pooled bag-of-words CE's gradients: (tol_h (E, K, d), tol_w (V, d), dz_pooled (E, 1)).

    h (E, K, d), w (V, d), z (E, K, V) the float64 logits, G (E, K, V) the float64 dL/dz (routed by
    the pooling), g_rows (E,) the weight of each example's loss (0 for an empty target set)."""
    E, K, d = h.shape
    V = w.shape[0]
    z = z.double()
    dz = logit_error_stored(h, w, dtype, storage).reshape(E, K, 1)  # (E, K, 1)
    if pooling == "max":
        zp, arg = z.max(dim=1)  # (E, V)
        route = torch.nn.functional.one_hot(arg, K).permute(0, 2, 1).double()  # (E, K, V)
    else:
        zp, route = z.mean(dim=1), torch.full_like(z, 1.0 / K)
    dzp = dz.amax(1)  # (E, 1) every row, hence the pooled value, within it
    Pp = zp.softmax(-1) * g_rows.double().abs()[:, None]  # (E, V) softmax part of dL/dz_pooled
    e = softmax_rel_error(zp, dzp, dtype)  # (E, 1)
    P = route * Pp[:, None, :]  # (E, K, V)
    tol_h, tol_w = xent_grad_tol(h.reshape(E * K, d), w, G.reshape(E * K, V), P.reshape(E * K, V),
                                 e.expand(E, K).reshape(E * K, 1), dtype, storage, n_rows)
    tol_h = tol_h.reshape(E, K, d)
    if pooling == "max":
        Gp = G.double().sum(1)  # (E, V) dL/dz_pooled
        u = unit_roundoff(dtype) + (unit_roundoff(storage) if storage is not None else 0.0)
        g_bound = Gp.abs() + e * Pp + 4 * u * Gp.abs()
        th, tw = max_tie_tol(h, w, z, g_bound, dz)
        tol_h, tol_w = tol_h + th, tol_w + tw
    return tol_h, tol_w, dzp


def pooled_tie_tol(h, w, z, G, P, e, positions, dz):
    """max_tie_tol for pooled groups inside a packed stream: h (N, d), w (V, d), z (N, V), G and P
    (N, V) dL/dz and its softmax part, e (N, 1) the rows' probability errors, positions (E, K) the
    pooled rows, dz (N, 1) the logit error bounds. Returns (tol_h (N, d), tol_w (V, d))."""
    u = unit_roundoff(torch.float32)
    Gp, Pp = G[positions].sum(1), P[positions].sum(1)  # (E, V) routed back to the pooled value
    g_bound = Gp.abs() + e[positions[:, 0]] * Pp + 4 * u * Gp.abs()  # (E, V)
    th, tw = max_tie_tol(h[positions], w, z[positions], g_bound, dz[positions])
    tol_h = torch.zeros(h.shape, dtype=torch.float64).index_put_((positions.reshape(-1),), th.reshape(-1, h.shape[1]),
                                                                  accumulate=True)
    return tol_h, tw


def mean_tol(x: torch.Tensor, dim: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float64: bound on x.mean(dim) evaluated in dtype (a sum of n terms in any order, then one
    division): γ_n·mean|x|."""
    return sum_tol(x.shape[dim], x.double().abs().mean(dim), dtype)


def pooled_unit_tol(states: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(E, d) float64: bound on each entry of normalize(states.to(dtype).mean(1)) evaluated in dtype,
    against the same formula in float64, states (E, K, d) float64.

    With a_j = mean_k |h_kj|, the cast, the K-term sum and the division leave each mean entry
    within μ_j = γ_(K+1)·a_j of m_j; the norm, its d squares summed in any order and a square
    root, is within γ_(d+1) of ‖m̂‖ (so ‖m‖ ± ‖μ‖), hence ≥ n_lo = (‖m‖ - ‖μ‖)(1 - γ_(d+1)); then
    |m̂_j/n̂ - m_j/‖m‖| ≤ (μ_j + |m_j|·(‖μ‖ + γ_(d+1)(‖m‖ + ‖μ‖))/‖m‖) / n_lo, plus the division's
    own u·(|m_j| + μ_j)/n_lo."""
    h = states.double()
    K, d = h.shape[1], h.shape[2]
    u = unit_roundoff(dtype)
    m = h.mean(1)  # (E, d)
    mu = gamma(K + 1, dtype) * h.abs().mean(1)  # (E, d)
    nm, nmu = m.norm(dim=-1, keepdim=True), mu.norm(dim=-1, keepdim=True)  # (E, 1)
    g = gamma(d + 1, dtype)
    n_lo = (nm - nmu) * (1 - g)
    if not bool((n_lo > 0).all()):
        raise ValueError("pooled_unit_tol: a pooled vector is within its rounding error of zero")
    return (mu + m.abs() * (nmu + g * (nm + nmu)) / nm + u * (m.abs() + mu)) / n_lo


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


def attention_tols(q, k, v, mask, do, dtype: torch.dtype = torch.float32, storage: torch.dtype | None = None):
    """Worst-case bounds on the errors of masked softmax attention evaluated with dtype arithmetic
    (fp32 accumulation, online softmax) and of its gradients, elementwise: (tol out (N, H, D), tol
    dq, tol dk, tol dv). storage: the half format inputs and outputs are stored in, if any.

    q (N, H, D), k, v (N, KV, D), mask (N, N) bool, do (N, H, D); computed in float64 from the
    magnitudes of the terms, by the rules of the module docstring:
    - a score s_ij = q_i·k_j/√D errs by δs_i = γ_D·max_j |q_i|·|k_j|/√D plus the scaling, log2(e)
      and running-max subtractions (EXP_ULPS·u·max_j |s_ij|); the probabilities p_ij (after
      normalising over n_i keys, the online rescalings included) then by a relative
      e_i = expm1(2·δs_i + γ_(n_i+8) + EXP_ULPS·u);
    - out_i = Σ_j p_ij v_j: e_i·(|P| @ |V|) plus its own n_i-term sum;
    - dV = Pᵀ dO, dP = dO Vᵀ, δ_i = dO_i·out_i, dS = P ∘ (dP - δ), dQ = dS K/√D, dK = dSᵀ Q/√D:
      each product's own sum bound plus its inputs' errors carried through |·|."""
    q, k, v, do = (t.detach().cpu().double() for t in (q, k, v, do))
    H, KV, D = q.shape[1], k.shape[1], q.shape[2]
    G = H // KV
    u = unit_roundoff(dtype)
    us = unit_roundoff(storage) if storage is not None else 0.0
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # (N, H, D)
    m = mask.cpu()[None]  # (1, N, N)
    N = q.shape[0]
    s = torch.einsum("ihd,jhd->hij", q, kr) / math.sqrt(D)  # (H, N, N)
    p = s.masked_fill(~m, float("-inf")).softmax(-1)  # (H, N, N)
    mag_s = torch.einsum("ihd,jhd->hij", q.abs(), kr.abs()) / math.sqrt(D)  # (H, N, N)
    n_keys = m.sum(-1, keepdim=True).double()  # (1, N, 1)
    gam = lambda n: n * u / (1 - n * u)
    ds_err = (gamma(D, dtype) + 2 * u) * mag_s.masked_fill(~m, 0).amax(-1, keepdim=True)  # (H, N, 1)
    ds_err = ds_err + EXP_ULPS * u * s.abs().masked_fill(~m, 0).amax(-1, keepdim=True)
    # (H, N, 1) relative error of p; + us where p is stored in the half format for the P·V product
    e = torch.expm1(2 * ds_err + gam(n_keys + 8) + EXP_ULPS * u) + us
    out = torch.einsum("hij,jhd->ihd", p, vr)  # (N, H, D)
    pv = torch.einsum("hij,jhd->ihd", p, vr.abs())  # (N, H, D)
    e_nhd = e.permute(1, 0, 2)  # (N, H, 1)
    tol_o = (e_nhd + gam(n_keys[0])[:, None]) * pv  # (N, H, D)
    n_q = m.sum(-2).double()[0]  # (N,) queries per key
    # dV_j = Σ_i p_ij dO_i, summed over the G heads of a kv head
    pdo = torch.einsum("hij,ihd->jhd", p, do.abs())  # (N, H, D)
    tol_dv = torch.einsum("hij,ihd->jhd", p * e, do.abs()) + gam(n_q * G)[:, None, None] * pdo
    tol_dv = tol_dv.reshape(N, KV, G, D).sum(2)  # (N, KV, D)
    dp = torch.einsum("ihd,jhd->hij", do, vr)  # (H, N, N)
    dp_err = gamma(D, dtype) * torch.einsum("ihd,jhd->hij", do.abs(), vr.abs())  # (H, N, N)
    delta = (do * out).sum(-1).t()[:, :, None]  # (H, N, 1)
    # δ_i from the stored output (its own error, and its storage rounding)
    delta_err = (gamma(D, dtype) * (do.abs() * out.abs()).sum(-1)
                 + (do.abs() * (tol_o + us * out.abs())).sum(-1)).t()[:, :, None]  # (H, N, 1)
    dS = p * (dp - delta)  # (H, N, N)
    dS_err = p * (dp_err + delta_err) + e * (p * (dp - delta).abs()) + (2 * u + us) * dS.abs()  # (H, N, N)
    absdS = dS.abs() + dS_err
    tol_dq = (gam(n_keys[0])[:, None] * torch.einsum("hij,jhd->ihd", dS.abs(), kr.abs())
              + torch.einsum("hij,jhd->ihd", dS_err, kr.abs())) / math.sqrt(D) * (1 + 2 * u)  # (N, H, D)
    tol_dk = (gam(n_q * G)[:, None, None] * torch.einsum("hij,ihd->jhd", absdS, q.abs())
              + torch.einsum("hij,ihd->jhd", dS_err, q.abs())) / math.sqrt(D) * (1 + 2 * u)  # (N, H, D)
    tol_dk = tol_dk.reshape(N, KV, G, D).sum(2)  # (N, KV, D)
    if storage is not None:  # each stored result rounded once more
        dq_mag = torch.einsum("hij,jhd->ihd", dS.abs(), kr.abs()) / math.sqrt(D)
        dk_mag = torch.einsum("hij,ihd->jhd", dS.abs(), q.abs()).reshape(N, KV, G, D).sum(2) / math.sqrt(D)
        dv_mag = pdo.reshape(N, KV, G, D).sum(2)
        tol_o, tol_dq = tol_o + us * (pv + tol_o), tol_dq + us * (dq_mag + tol_dq)
        tol_dk, tol_dv = tol_dk + us * (dk_mag + tol_dk), tol_dv + us * (dv_mag + tol_dv)
        if G > 1:  # grouped heads: each head's dK / dV may be stored (us) and the G summed in the half
            gs = us + gamma(G - 1, storage)  # format (γ_(G-1) of its u), as sdpa's expanded K, V do
            tol_dk, tol_dv = tol_dk + gs * (dk_mag + tol_dk), tol_dv + gs * (dv_mag + tol_dv)
    return tol_o, tol_dq, tol_dk, tol_dv
