"""The reference LLaRA training step, re-implemented from its description (DESIGN §1, §6):
the baseline that benchmarks/throughput.py runs side by side with llara_fast's Trainer step (llara_fast.train).

What the released code does, and so what this file does:
- HF transformers ``LlamaForCausalLM``, SDPA attention (``attn_implementation="sdpa"``); flash
  attention is refused by the reference (its custom mask needs the dense path).
- Each example is one sequence ``BOS " TEXT SUM PRED`` (the pieces tokenised separately and
  concatenated, exactly the ids llara_fast packs), LEFT-padded to the longest example of the
  batch (``collate``: the data collator, run on the host like a DataLoader worker).
- A dense 4-D mask (B, 1, L, L) built on the device each step (``attention_mask_4d``): causal,
  pad keys blocked, PRED blocked from SUM; position ids 0.. from the first real token, PRED's
  restarting at SUM's first position. A pad query row may see only itself (its output is never
  used; a fully masked row would give NaN in SDPA, whose 0 x NaN then poisons the gradients).
- Logits for EVERY position, upcast to fp32 (transformers 4.3x, which the reference ran on, did
  ``logits.float()`` inside ``LlamaForCausalLM.forward``; current versions do not, so it is done
  right after the forward: the (B, L, V) fp32 tensor is materialised as in the reference).
- Losses on those logits: LM = shifted next-token CE over the TEXT tokens (labels -100 elsewhere,
  mean over the batch's text tokens); EBAE / EBAR = the rows of <s1>..<s8> / <s9>..<s16>, max
  over the 8 rows (``max(dim).values``: the gradient goes to the winning row), log_softmax, mean
  of -log p over the unique targets, averaged over the examples whose target set is not empty;
  total = w_lm·LM + w_bow·(EBAE + EBAR)/2 with w_bow = 0.1 (the reference's "/10").
- AdamW (``torch.optim.AdamW``, fused on CUDA like DeepSpeed's FusedAdam), gradient clipping to
  1.0 (HF Trainer's default max_grad_norm). bf16 on GPU in one of two ways:
  ``MasterWeightAdamW`` (the default of benchmarks/throughput.py, "deepspeed"): as the reference
  ran it under DeepSpeed ZeRO-1 with bf16, the module itself is bf16 (residual stream, norms and
  logits in bf16) and fp32 master weights live in the optimizer; or "autocast": HF Trainer's
  ``bf16=True`` without DeepSpeed, fp32 parameters and ``torch.autocast(dtype=bfloat16)``, whose
  RMSNorm output (fp32 weight x bf16 activation) keeps the residual stream in fp32.

Target sets are the ones llara_fast's prepare makes (the tokenizer's special ids excluded rather
than the reference's ids <= 2, DESIGN §1's one deliberate difference), so that both sides train
the identical objective on identical examples; tests/e2e/test_throughput.py checks that the
losses and gradients agree to float64 rounding (both sides in float64: ``build_hf_model(...,
dtype=torch.float64)`` computes transformers' norms and RoPE angles in float64 too).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F

from llara_fast.batch import Example
from llara_fast.objectives.llara import LossConfig
from llara_fast.templates import Template
from llara_fast.train.step import fused_adamw_ok


@dataclass
class PaddedBatch:
    """B examples, each one left-padded row of length L."""
    input_ids: torch.Tensor       # (B, L) int64, pad_id on the left
    position_ids: torch.Tensor    # (B, L) int64, 0 on pads
    labels: torch.Tensor          # (B, L) int64, the TEXT token ids at TEXT positions, -100 elsewhere
    pad: torch.Tensor             # (B,) int64, pad tokens at the left of each row
    sum_start: torch.Tensor       # (B,) int64, column of SUM's first token
    pred_start: torch.Tensor      # (B,) int64, column of PRED's first token
    sum_positions: torch.Tensor   # (B, K) int64, columns of <s1>..<sK>
    pred_positions: torch.Tensor  # (B, K) int64, columns of <s9>..<s(8+K)>
    sum_targets: torch.Tensor     # (B, A) int64, unique EBAE target ids, -1 padded
    pred_targets: torch.Tensor    # (B, R) int64, unique EBAR target ids, -1 padded

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int(self.input_ids.numel() - self.pad.sum())

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device, non_blocking: bool = False) -> "PaddedBatch":
        return PaddedBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                              for f in fields(self)})

    def pin_memory(self) -> "PaddedBatch":
        return PaddedBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


def collate(examples: Sequence[Example], template: Template, max_len: int, pad_id: int) -> PaddedBatch:
    """The reference's data collator: BOS " TEXT SUM PRED per example, left padding to the longest."""
    if len(examples) == 0:
        raise ValueError("collate: no examples")
    P, S, R = len(template.prefix_ids), len(template.sum_ids), len(template.pred_ids)
    texts = [[int(t) for t in ex.text_ids[:max_len]] for ex in examples]
    L = max(P + len(t) + S + R for t in texts)
    B = len(examples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.int64)
    position_ids = torch.zeros((B, L), dtype=torch.int64)
    labels = torch.full((B, L), -100, dtype=torch.int64)
    pad = torch.zeros(B, dtype=torch.int64)
    for b, text in enumerate(texts):
        T = len(text)
        o = L - (P + T + S + R)  # left padding
        seq = list(template.prefix_ids) + text + list(template.sum_ids) + list(template.pred_ids)
        input_ids[b, o:] = torch.tensor(seq)
        position_ids[b, o:o + P + T + S] = torch.arange(P + T + S)
        position_ids[b, o + P + T + S:] = torch.arange(P + T, P + T + R)  # PRED restarts at SUM's position
        labels[b, o + P:o + P + T] = torch.tensor(text, dtype=torch.int64)
        pad[b] = o
    T_all = torch.tensor([len(t) for t in texts])
    sum_start = pad + P + T_all
    pred_start = sum_start + S
    sum_positions = sum_start[:, None] + torch.tensor(template.sum_special_offsets)[None]    # (B, K)
    pred_positions = pred_start[:, None] + torch.tensor(template.pred_special_offsets)[None]  # (B, K)

    def padded_sets(sets) -> torch.Tensor:
        width = max(len(s) for s in sets)
        out = torch.full((B, width), -1, dtype=torch.int64)
        for b, s in enumerate(sets):
            ids = sorted(set(int(t) for t in s))  # unique targets
            out[b, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    return PaddedBatch(input_ids, position_ids, labels, pad, sum_start, pred_start, sum_positions, pred_positions,
                       padded_sets([ex.sum_targets for ex in examples]),
                       padded_sets([ex.pred_targets for ex in examples]))


def attention_mask_4d(batch: PaddedBatch) -> torch.Tensor:
    """(B, 1, L, L) bool, True = may attend: causal, no pad keys, PRED never sees SUM; a pad query
    row sees only itself. Built on the batch's device."""
    B, L = batch.input_ids.shape
    idx = torch.arange(L, device=batch.input_ids.device)
    q, k = idx.view(1, L, 1), idx.view(1, 1, L)
    pad = batch.pad.view(B, 1, 1)
    ss, ps = batch.sum_start.view(B, 1, 1), batch.pred_start.view(B, 1, 1)
    allowed = (k <= q) & (k >= pad)                                    # (B, L, L)
    allowed &= ~((q >= ps) & (k >= ss) & (k < ps))                     # PRED never sees SUM
    allowed |= (q < pad) & (k == q)                                    # pad rows: themselves only
    return allowed.unsqueeze(1)                                        # (B, 1, L, L)


def build_hf_model(model, device: torch.device | str = "cpu", attn_implementation: str = "sdpa",
                   dtype: torch.dtype = torch.float32):
    """transformers' causal LM of the model's family (LlamaForCausalLM, Mistral-, Qwen2-, Qwen3-)
    holding exactly ``model``'s weights (a llara_fast Transformer), in ``dtype`` (fp32; float64 for
    exact-algebra runs, with float64_norms_and_rope), in training mode. Built directly on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llara_fast.io.hf import ours_to_hf

    hf_cfg = model.args.to_hf_config()
    cfg = AutoConfig.for_model(hf_cfg["model_type"], **{k: v for k, v in hf_cfg.items()
                                                         if k not in ("architectures", "model_type")})
    cfg._attn_implementation = attn_implementation
    try:  # skip the random init that the weights below overwrite anyway (transformers >= 5)
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    with torch.device(device), no_init_weights():
        ref = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = ref.load_state_dict(ours_to_hf(model.state_dict()), strict=False)
    if model.args.tie_embeddings:
        ref.tie_weights()
    tied = ["lm_head.weight"] if model.args.tie_embeddings else []
    if sorted(missing) != tied or unexpected:
        raise RuntimeError(f"weights do not map onto {type(ref).__name__}: missing {missing}, "
                           f"unexpected {unexpected}")
    if model.args.tie_embeddings and ref.lm_head.weight.data_ptr() != ref.model.embed_tokens.weight.data_ptr():
        raise RuntimeError(f"{type(ref).__name__} did not tie lm_head to embed_tokens")
    ref = ref.to(dtype).train()
    if dtype == torch.float64:
        float64_norms_and_rope(ref.model)
    return ref


def float64_norms_and_rope(ref):
    """transformers rounds RMSNorm and the RoPE angles (and eager attention's softmax) to fp32
    whatever the model's dtype; for the float64 (exact-algebra) comparisons its modules (``ref``:
    a LlamaModel-like body with ``rotary_emb``) compute them in float64 instead, the same
    formulas, so both sides agree to float64 rounding."""
    import types

    def rmsnorm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):
        freqs = position_ids[..., None].double() * self.inv_freq.double()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    for m in ref.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = types.MethodType(rmsnorm, m)
    ref.rotary_emb.forward = types.MethodType(rotary, ref.rotary_emb)


def _bow(logits: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, pooling: str) -> torch.Tensor:
    """Mean over examples with a non-empty set of mean_{t in set} -log_softmax(pool_k logits[pos_k])_t."""
    b = torch.arange(logits.shape[0], device=logits.device)[:, None]
    rows = logits[b, positions]                                  # (B, K, V)
    z = rows.max(dim=1).values if pooling == "max" else rows.mean(dim=1)  # (B, V)
    logp = torch.log_softmax(z, dim=-1)                          # (B, V)
    valid = targets >= 0                                         # (B, A)
    picked = logp.gather(1, targets.clamp(min=0))                # (B, A)
    n = valid.sum(1)
    per_example = -(picked * valid).sum(1) / n.clamp(min=1)      # (B,)
    has = n > 0
    return (per_example * has).sum() / has.sum().clamp(min=1)


def reference_loss(logits: torch.Tensor, batch: PaddedBatch, cfg: LossConfig = LossConfig()):
    """(total, lm, ebae, ebar) from the logits of every position (B, L, V)."""
    if cfg.tasks != "ebae,ebar":
        raise ValueError(f"the released recipe trains EBAE and EBAR together; loss tasks {cfg.tasks!r} is ours only")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (B, L, V) fp32, every position
    V = logits.shape[-1]
    lm = F.cross_entropy(logits[:, :-1].reshape(-1, V), batch.labels[:, 1:].reshape(-1), ignore_index=-100)
    ebae = _bow(logits, batch.sum_positions, batch.sum_targets, cfg.pooling)
    ebar = _bow(logits, batch.pred_positions, batch.pred_targets, cfg.pooling)
    total = cfg.w_lm * lm + cfg.w_bow * (ebae + ebar) / 2
    return total, lm, ebae, ebar


def reference_forward(model, batch: PaddedBatch, cfg: LossConfig = LossConfig(),
                      amp_dtype: torch.dtype | None = None):
    """Forward and loss of one padded batch already on the model's device."""
    amp = (torch.autocast(batch.input_ids.device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    with amp:
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                    attention_mask=attention_mask_4d(batch), use_cache=False)
        return reference_loss(out.logits, batch, cfg)


def build_optimizer(model, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95), eps: float = 1e-8):
    """AdamW over all parameters, fused (DeepSpeed's fused Adam on a GPU; torch's on the CPU too)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = fused_adamw_ok(params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


class MasterWeightAdamW:
    """DeepSpeed-style bf16 training (the reference's ZeRO-1 with bf16 on one rank): the module's
    parameters and gradients are bf16; each step the gradients are copied to fp32 master
    parameters, clipped there, AdamW updates the masters, and the bf16 parameters are refreshed
    from them."""

    def __init__(self, model, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95), eps: float = 1e-8):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone() for p in self.params]
        fused = fused_adamw_ok(self.master)
        self.inner = torch.optim.AdamW(self.master, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                       fused=fused)

    def master_grads(self) -> list[torch.Tensor]:
        """fp32 copies of the module's gradients on the master parameters (what clipping sees)."""
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
        return self.master

    def step(self) -> None:
        self.inner.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)  # bf16 <- fp32

    def zero_grad(self, set_to_none: bool = True) -> None:
        for t in self.params + self.master:
            t.grad = None


def reference_step(model, batch: PaddedBatch, optimizer, *, device: torch.device, cfg: LossConfig = LossConfig(),
                   amp_dtype: torch.dtype | None = None, grad_clip: float = 1.0) -> dict:
    """One optimizer step on one padded batch: forward, loss, backward, clip, AdamW step.
    ``amp_dtype``: autocast the forward (fp32 module); a bf16 module with ``MasterWeightAdamW``
    needs none. Returns the loss parts and the gradient norm (one host sync, as llara_fast's step)."""
    batch = batch.to(device, non_blocking=True)
    total, lm, ebae, ebar = reference_forward(model, batch, cfg, amp_dtype)
    total.backward()
    params = optimizer.master_grads() if isinstance(optimizer, MasterWeightAdamW) else list(model.parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    vals = torch.stack([total.detach(), lm.detach(), ebae.detach(), ebar.detach(), grad_norm.to(total.dtype)]).tolist()
    return dict(zip(("loss", "lm", "ebae", "ebar", "grad_norm"), vals))
