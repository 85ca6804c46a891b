"""A hand-written LLaMA over packed, unpadded batches.

Reads top to bottom: RoPE helpers, RMSNorm, Attention, FeedForward, Block, Transformer.
``Transformer.forward(batch)`` returns the final-normed hidden states (N, d) of the flat
token stream; the LM head is applied only where a loss asks for it (``lm_head_weight``).
Weights and RoPE follow HF transformers' LLaMA conventions, so checkpoints map 1:1.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llara_fast.attention import AttnMeta, build_meta, packed_attention, resolve_backend
from llara_fast.batch import PackedBatch
from llara_fast.config import ModelArgs
from llara_fast.errors import UserError


# ---- RoPE ----------------------------------------------------------------------------------
def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), fp32, with LLaMA-3.1 scaling when configured."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    sc = args.rope_scaling
    if not sc:
        return inv_freq
    factor = float(sc["factor"])
    low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_ctx = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    blend = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - blend) * scaled / factor + blend * scaled
    in_band = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(in_band, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin (N, head_dim) for the given positions, HF's duplicated-halves layout. Angles in
    fp32 (float64 when the model is float64, for exact-algebra tests)."""
    acc = torch.promote_types(inv_freq.dtype, torch.float32)
    angles = positions.to(acc)[:, None] * inv_freq.to(acc)[None, :]  # (N, hd/2)
    emb = torch.cat((angles, angles), dim=-1)  # (N, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, H, D); rotate pairs (i, i + D/2) as HF's rotate_half does: x*cos + rotate_half(x)*sin,
    computed on the halves (cos and sin repeat over them), the same products and sums."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (N, H, D/2) each
    c, s = cos[:, None, :half], sin[:, None, :half]  # (N, 1, D/2)
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)  # (N, H, D)
    out = torch.empty_like(x)  # inference: each half written in place, no concatenation
    lo, hi = out[..., :half], out[..., half:]
    torch.mul(x1, c, out=lo)
    lo.sub_(x2 * s)
    torch.mul(x2, c, out=hi)
    hi.add_(x1 * s)
    return out


# ---- modules -------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64) and self.weight.dtype == x.dtype:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # the formula below, one fused kernel
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 at least
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # Qwen3: RMSNorm over each head's q and k (before RoPE)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        N = x.shape[0]
        q = self.wq(x).view(N, self.n_heads, self.head_dim)  # (N, H, D)
        k = self.wk(x).view(N, self.n_kv_heads, self.head_dim)  # (N, KV, D)
        v = self.wv(x).view(N, self.n_kv_heads, self.head_dim)  # (N, KV, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # (N, H, D), (N, KV, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = packed_attention(q, k, v, meta)  # (N, H, D)
        return self.wo(o.reshape(N, self.n_heads * self.head_dim))  # (N, d)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_hidden, bias=False)  # gate
        self.w2 = nn.Linear(args.ffn_hidden, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.ffn_hidden, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (N, d)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, meta: AttnMeta) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, meta)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, attn_backend: str = "auto"):
        super().__init__()
        self.args = args
        self.attn_backend = attn_backend
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("rope_inv_freq", rope_inv_freq(args), persistent=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, d): the output projection, or the input embedding when tied."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def init_weights(self, std: float = 0.02, seed: int | None = None):
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
            self.rope_inv_freq.copy_(rope_inv_freq(self.args))

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """batch: PackedBatch on this module's device. Returns hidden states (N, d)."""
        window = self.args.sliding_window
        if window and batch.max_seqlen_k > window:
            raise UserError(f"a sequence of {batch.max_seqlen_k} tokens exceeds the model's sliding window of "
                            f"{window}; the packed attention does not window: lower the text length")
        h = self.tok_embeddings(batch.input_ids)  # (N, d)
        backend = resolve_backend(self.attn_backend, batch.input_ids.device, h.dtype)
        meta = build_meta(batch, backend)
        cos, sin = rope_cos_sin(self.rope_inv_freq, batch.position_ids, h.dtype)  # (N, hd) each
        for layer in self.layers:
            h = layer(h, cos, sin, meta)
        return self.norm(h)  # (N, d)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits (float64 for a float64 model) for a few rows (N', d) -> (N', V). Losses use
        the fused kernels instead."""
        acc = torch.promote_types(hidden.dtype, torch.float32)
        return hidden.to(acc) @ self.lm_head_weight.to(acc).t()  # (N', V)
