"""The LLaRA objective over a PackedBatch (DESIGN §1).

    total = w_lm · LM + w_bow · (mean_i EBAE_i + mean_i EBAR_i) / 2

LM is the next-token CE over the TEXT tokens of the batch; EBAE / EBAR are the pooled
bag-of-words CEs at <s1>..<sK> / <s9>..<s(8+K)>, each averaged over the examples whose
target set is not empty. All logits are fp32 (accumulated in fp32 from the compute dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llara_fast.kernels.bow_xent import bow_xent
from llara_fast.kernels.linear_xent import linear_xent
from llara_fast.kernels.reference import bow_xent_reference, linear_xent_reference

IMPLS = ("auto", "triton", "torch", "reference")


@dataclass
class LossConfig:
    w_lm: float = 1.0        # 0 gives the paper's objective without the LM loss
    w_bow: float = 0.1       # the reference divides each bag-of-words loss by 10
    pooling: str = "max"     # pooling of the K special rows: "max" (released code) or "mean"
    impl: str = "auto"       # "auto" (Triton on GPU, chunked PyTorch on CPU), "triton", "torch", "reference"

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"loss impl must be one of {IMPLS}, got {self.impl!r}")
        if self.pooling not in ("max", "mean"):
            raise ValueError(f"pooling must be 'max' or 'mean', got {self.pooling!r}")


@dataclass
class LossOutput:
    total: torch.Tensor  # () fp32, differentiable
    lm: torch.Tensor     # () detached parts, for logging
    ebae: torch.Tensor
    ebar: torch.Tensor
    n_ebae: torch.Tensor  # examples with a non-empty EBAE target set
    n_ebar: torch.Tensor


def _bow_sum(hidden, positions, offsets, ids, weight, cfg: LossConfig):
    rows = hidden[positions]  # (E, K, d)
    if cfg.impl == "reference":
        loss, valid = bow_xent_reference(rows, weight, offsets, ids, cfg.pooling)
    else:
        loss, valid = bow_xent(rows, weight, offsets, ids, cfg.pooling, impl=cfg.impl)
    return (loss * valid).sum(), valid.sum()  # summed over examples with targets, and their count


def loss_denominators(batch) -> torch.Tensor:
    """(3,) fp32 on the batch's device: text tokens, examples with an EBAE set, with an EBAR set.
    Summed over the micro-batches (and ranks) of a step, they normalise each part globally."""
    return torch.stack([
        torch.tensor(float(batch.lm_positions.numel()), device=batch.sum_offsets.device),
        (batch.sum_offsets.diff() > 0).sum().float(),
        (batch.pred_offsets.diff() > 0).sum().float()])


def llara_loss(hidden: torch.Tensor, batch, head_weight: torch.Tensor, cfg: LossConfig = LossConfig(),
               denominators: torch.Tensor | None = None) -> LossOutput:
    """hidden (N, d): final-normed hidden states of the batch; head_weight (V, d): the LM head.
    denominators: the step's global (text tokens, EBAE examples, EBAR examples) when the batch is
    one micro-batch of several; each part is then this batch's share of the step's mean."""
    if hidden.dim() != 2 or hidden.shape[0] != batch.num_tokens:
        raise ValueError(f"hidden must be (N={batch.num_tokens}, d), got {tuple(hidden.shape)}")
    zero = hidden.new_zeros((), dtype=torch.float32)
    M = batch.lm_positions.numel()
    if cfg.w_lm != 0 and M > 0:
        h = hidden[batch.lm_positions]  # (M, d)
        if cfg.impl == "reference":
            lm_sum = linear_xent_reference(h, head_weight, batch.lm_targets) * M
        else:
            lm_sum = linear_xent(h, head_weight, batch.lm_targets, impl=cfg.impl) * M
    else:
        lm_sum = zero
    ebae_sum, n_ebae = _bow_sum(hidden, batch.sum_positions, batch.sum_offsets, batch.sum_ids, head_weight, cfg)
    ebar_sum, n_ebar = _bow_sum(hidden, batch.pred_positions, batch.pred_offsets, batch.pred_ids, head_weight, cfg)
    if denominators is None:
        denominators = torch.stack([torch.tensor(float(M), device=hidden.device), n_ebae.float(), n_ebar.float()])
    d = denominators.to(hidden.device, torch.float32).clamp(min=1)
    lm, ebae, ebar = lm_sum / d[0], ebae_sum / d[1], ebar_sum / d[2]
    total = cfg.w_lm * lm + cfg.w_bow * (ebae + ebar) / 2
    return LossOutput(total, lm.detach(), ebae.detach(), ebar.detach(), n_ebae, n_ebar)
