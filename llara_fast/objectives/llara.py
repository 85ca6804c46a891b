"""The LLaRA objective over a PackedBatch (DESIGN §1).

    total = w_lm · LM + w_bow · (mean_i EBAE_i + mean_i EBAR_i) / 2

LM is the next-token CE over the TEXT tokens of the batch; EBAE / EBAR are the pooled
bag-of-words CEs at <s1>..<sK> / <s9>..<s(8+K)>, each averaged over the examples whose
target set is not empty. All logits are fp32 (accumulated in fp32 from the compute dtype), or
float64 in a float64 run.

Ablations: ``tasks`` = "ebae" or "ebar" keeps one of the two, total = w_lm · LM + w_bow · that
task's mean; the other is still computed, without a graph, and logged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from llara_fast.batch import PackedBatch
from llara_fast.config import opt
from llara_fast.errors import UserError
from llara_fast.kernels import acc_dtype
from llara_fast.kernels.bow_xent import bow_xent
from llara_fast.kernels.linear_xent import linear_xent
from llara_fast.kernels.reference import bow_xent_reference, linear_xent_reference

IMPLS = ("auto", "triton", "torch", "reference")
TASKS = ("ebae,ebar", "ebae", "ebar")


@dataclass
class LossConfig:
    w_lm: float = opt(1.0, "weight of the LM loss (0: the paper's objective without it)")
    w_bow: float = opt(0.1, "weight of (EBAE + EBAR) / 2 (the released code divides each by 10)")
    pooling: str = opt("max", "pooling of the K special rows: max (the released code) or mean", ("max", "mean"))
    impl: str = opt("auto", "auto (Triton on GPU, chunked PyTorch on CPU), triton, torch, reference", IMPLS)
    lm_chunk_rows: int = opt(0, "rows per chunk of the fused LM loss (0: the fewest chunks its memory budget allows)")
    tasks: str = opt("ebae,ebar", "bag-of-words tasks trained: ebae,ebar (the recipe), or ebae / ebar alone "
                     "(an ablation: w_bow times that task's loss; the other is still logged)", TASKS)

    def __post_init__(self):
        if self.lm_chunk_rows < 0:
            raise ValueError(f"loss lm_chunk_rows must be >= 0, got {self.lm_chunk_rows}")
        if self.tasks not in TASKS:
            raise ValueError(f"loss tasks must be one of {TASKS}, got {self.tasks!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"loss impl must be one of {IMPLS}, got {self.impl!r}")
        if self.pooling not in ("max", "mean"):
            raise ValueError(f"pooling must be 'max' or 'mean', got {self.pooling!r}")


@dataclass
class LossOutput:
    total: torch.Tensor  # () fp32 (float64 in a float64 run), differentiable
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


def loss_denominators(batch: PackedBatch) -> torch.Tensor:
    """(3,) fp32 on the batch's device: text tokens, examples with an EBAE set, with an EBAR set.
    Summed over the micro-batches (and ranks) of a step, they normalise each part globally."""
    return torch.stack([
        torch.tensor(float(batch.lm_positions.numel()), device=batch.sum_offsets.device),
        (batch.sum_offsets.diff() > 0).sum().float(),
        (batch.pred_offsets.diff() > 0).sum().float()])


def llara_loss(hidden: torch.Tensor, batch: PackedBatch, head_weight: torch.Tensor, cfg: LossConfig = LossConfig(),
               denominators: torch.Tensor | None = None) -> LossOutput:
    """hidden (N, d): final-normed hidden states of the batch; head_weight (V, d): the LM head.
    denominators: the step's global (text tokens, EBAE examples, EBAR examples) when the batch is
    one micro-batch of several; each part is then this batch's share of the step's mean."""
    if hidden.dim() != 2 or hidden.shape[0] != batch.num_tokens:
        raise ValueError(f"hidden must be (N={batch.num_tokens}, d), got {tuple(hidden.shape)}")
    acc = acc_dtype(hidden.dtype)  # the losses' dtype: fp32, float64 for float64 states
    zero = hidden.new_zeros((), dtype=acc)
    M = batch.lm_positions.numel()
    if cfg.w_lm != 0 and M > 0:
        h = hidden[batch.lm_positions]  # (M, d)
        if cfg.impl == "reference":
            lm_sum = linear_xent_reference(h, head_weight, batch.lm_targets) * M
        else:
            lm_sum = linear_xent(h, head_weight, batch.lm_targets, cfg.lm_chunk_rows or None, impl=cfg.impl) * M
    else:
        lm_sum = zero
    with torch.set_grad_enabled(torch.is_grad_enabled() and "ebae" in cfg.tasks):
        ebae_sum, n_ebae = _bow_sum(hidden, batch.sum_positions, batch.sum_offsets, batch.sum_ids, head_weight, cfg)
    with torch.set_grad_enabled(torch.is_grad_enabled() and "ebar" in cfg.tasks):
        ebar_sum, n_ebar = _bow_sum(hidden, batch.pred_positions, batch.pred_offsets, batch.pred_ids, head_weight, cfg)
    if denominators is None:
        denominators = torch.stack([torch.tensor(float(M), device=hidden.device), n_ebae.float(), n_ebar.float()])
    d = denominators.to(hidden.device, acc).clamp(min=1)
    lm, ebae, ebar = lm_sum / d[0], ebae_sum / d[1], ebar_sum / d[2]
    bow = {"ebae,ebar": (ebae + ebar) / 2, "ebae": ebae, "ebar": ebar}[cfg.tasks]
    total = cfg.w_lm * lm + cfg.w_bow * bow
    return LossOutput(total, lm.detach(), ebae.detach(), ebar.detach(), n_ebae, n_ebar)


# ---- training ------------------------------------------------------------------------------------
class LlaraTrainModule(nn.Module):
    """Model + LLaRA loss as one module, so that FSDP's root (embedding, final norm, LM head)
    is unsharded while the loss reads the head. Returns plain tensors (FSDP hooks on outputs)."""

    def __init__(self, model: nn.Module, loss_cfg: LossConfig):
        super().__init__()
        self.model = model
        self.loss_cfg = loss_cfg

    def forward(self, batch: PackedBatch, denominators: torch.Tensor | None = None):  # denominators: (3,) int64
        hidden = self.model(batch)  # (N, d)
        out = llara_loss(hidden, batch, self.model.lm_head_weight, self.loss_cfg, denominators)
        return out.total, torch.stack([out.lm, out.ebae, out.ebar])


@dataclass
class LlaraStep:
    """One optimizer step of LLaRA, in the units the log and the FLOP accounting use."""
    loss: float
    lm: float
    ebae: float
    ebar: float
    grad_norm: float
    tokens: int          # real tokens in the step's global batch
    examples: int        # passages in the step's global batch
    attn_pairs: int      # allowed (query, key) pairs, for FLOP accounting
    head_positions: int  # rows the LM head is applied to
    seconds: float
    skipped: bool


class LlaraObjective:
    """The LLaRA objective for llara_fast.train.step.optimizer_step: micro-batches are PackedBatches.
    Each part of the loss is normalised by the step's global count (all micro-batches of all
    ranks), so the result does not depend on how the global batch is split."""
    n_parts = 4  # total, lm, ebae, ebar
    loss_parts = ("lm", "ebae", "ebar")  # the metrics fields drawn beside the total in RUN/loss.png

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def check(self, micro_batches: Sequence[PackedBatch]) -> None:
        """Token and target ids inside the vocabulary, checked on the host copy before any kernel
        runs (on the GPU the kernels do not check: that would cost a host synchronisation)."""
        for i, b in enumerate(micro_batches):
            for name in ("input_ids", "lm_targets", "sum_ids", "pred_ids"):
                t = getattr(b, name)
                if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.vocab_size):
                    bad = int(t.max()) if int(t.max()) >= self.vocab_size else int(t.min())
                    raise UserError(f"micro-batch {i}: {name} holds id {bad}, outside the model's vocabulary "
                                    f"[0, {self.vocab_size}); was the data prepared with this model's tokenizer?")

    def counts(self, micro_batches: Sequence[PackedBatch]) -> torch.Tensor:
        """(7,) float64: the loss denominators (text tokens, EBAE and EBAR examples), then tokens,
        examples, attention pairs and LM-head rows for the log and the FLOP accounting."""
        local = torch.stack([loss_denominators(b) for b in micro_batches]).sum(0)  # (3,)
        stats = torch.tensor([sum(b.num_tokens for b in micro_batches), sum(b.num_examples for b in micro_batches),
                              sum(b.attn_pairs() for b in micro_batches),
                              sum(b.lm_positions.numel() + 2 * b.sum_positions.numel() for b in micro_batches)],
                             dtype=torch.float64)
        return torch.cat([local.double(), stats])

    def forward(self, module: nn.Module, batch: PackedBatch, counts: torch.Tensor, device: torch.device):
        # Integer denominators: FSDP's mixed precision casts floating forward inputs to bf16, which
        # would round a token count (3,382 -> 3,376) and mis-scale the loss; integers pass unchanged.
        total, p = module(batch.to(device, non_blocking=True), counts[:3].round().long())
        return total, torch.cat([total.detach()[None], p])

    @staticmethod
    def result(s) -> LlaraStep:
        """The LlaraStep of a StepStats."""
        c = s.counts
        return LlaraStep(*s.parts, s.grad_norm, int(c[3]), int(c[4]), int(c[5]), int(c[6]), s.seconds, s.skipped)
