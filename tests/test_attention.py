"""Attention backends against a direct per-example transcription of the DESIGN §1 mask."""
import math

import numpy as np
import pytest
import torch

from conftest import random_examples, toy_template
from llara_fast.attention import available_backends, build_meta, packed_attention, resolve_backend
from llara_fast.data.packing import pack_encode_reference, pack_reference


def naive_attention(q, k, v, tpl, text_lens):
    """float64, explicit scores: example by example, PRED rows blocked from SUM columns."""
    H, KV = q.shape[1], k.shape[1]
    k = k.repeat_interleave(H // KV, 1).double()
    v = v.repeat_interleave(H // KV, 1).double()
    q = q.double()
    out = torch.empty_like(q)
    P, S, R = len(tpl.prefix_ids), len(tpl.sum_ids), len(tpl.pred_ids)
    start = 0
    for T in text_lens:
        L = P + T + S + R
        allowed = torch.ones(L, L, dtype=torch.bool).tril()
        allowed[P + T + S:, P + T:P + T + S] = False
        qs, ks, vs = q[start:start + L], k[start:start + L], v[start:start + L]
        scores = torch.einsum("ihd,jhd->hij", qs, ks) / math.sqrt(q.shape[-1])  # (H, L, L)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[start:start + L] = torch.einsum("hij,jhd->ihd", scores.softmax(-1), vs)  # (L, H, D)
        start += L
    return out


@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
def test_sdpa_matches_naive(heads):
    H, KV = heads
    rng = np.random.default_rng(0)
    tpl = toy_template(100)
    lens = [3, 17, 0, 9]
    b = pack_reference(random_examples(rng, lens, 100), tpl, 100)
    g = torch.Generator().manual_seed(0)
    N = b.num_tokens
    q, k, v = (torch.randn(N, h, 16, generator=g) for h in (H, KV, KV))
    got = packed_attention(q, k, v, build_meta(b, "sdpa"))
    torch.testing.assert_close(got.double(), naive_attention(q, k, v, tpl, lens), atol=1e-5, rtol=1e-5)


def test_sdpa_grads_match_naive():
    """Backward through the masked blocks with grouped-query heads (enable_gqa)."""
    rng = np.random.default_rng(2)
    tpl = toy_template(100)
    lens = [5, 11]
    b = pack_reference(random_examples(rng, lens, 100), tpl, 100)
    g = torch.Generator().manual_seed(2)
    N = b.num_tokens
    q, k, v = (torch.randn(N, h, 8, generator=g, requires_grad=True) for h in (6, 2, 2))
    w = torch.randn(N, 6, 8, generator=g)
    got = torch.autograd.grad((packed_attention(q, k, v, build_meta(b, "sdpa")) * w).sum(), (q, k, v))
    want = torch.autograd.grad((naive_attention(q, k, v, tpl, lens) * w.double()).sum(), (q, k, v))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [(2, 2), (6, 2)])
def test_sdpa_encode_layout_is_per_segment(heads):
    """Encoding batches are one plain causal segment per text: no mask is built, and each
    segment equals float64 causal attention over its own tokens only."""
    H, KV = heads
    tpl = toy_template(100)
    b, _ = pack_encode_reference([[5, 6, 7], [8, 9], [4] * 9], tpl, "passage", 10)
    meta = build_meta(b, "sdpa")
    assert [m for _, _, m in meta.blocks] == [None, None, None]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b.num_tokens, h, 8, generator=g) for h in (H, KV, KV))
    got = packed_attention(q, k, v, meta)
    cu = b.cu_seqlens_q.tolist()
    for s in range(3):
        sl = slice(cu[s], cu[s + 1])
        L = cu[s + 1] - cu[s]
        qs = q[sl].double()
        ks = k[sl].double().repeat_interleave(H // KV, 1)
        vs = v[sl].double().repeat_interleave(H // KV, 1)
        scores = torch.einsum("ihd,jhd->hij", qs, ks) / math.sqrt(8)  # (H, L, L)
        scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        want = torch.einsum("hij,jhd->ihd", scores.softmax(-1), vs)  # (L, H, D)
        torch.testing.assert_close(got[sl].double(), want, atol=1e-5, rtol=1e-5)


def test_backend_resolution():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert available_backends("cpu") == ["sdpa"]
    with pytest.raises(RuntimeError, match="unavailable"):
        resolve_backend("torch_varlen", "cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("xformers", "cpu")


GPU_BACKENDS = [b for b in ("torch_varlen", "flash_attn")]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backend_matches_sdpa_bf16(backend):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: GPU attention backends are compared with sdpa on a GPU only")
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} is not installed on this machine")
    H, KV, D = 8, 2, 64
    rng = np.random.default_rng(0)
    tpl = toy_template(1000)
    lens = [100, 3, 511, 40]
    b = pack_reference(random_examples(rng, lens, 1000), tpl, 1000).to("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b.num_tokens, h, D, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (H, KV, KV))
    do = torch.randn(b.num_tokens, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    want = packed_attention(q, k, v, build_meta(b, "sdpa"))
    gw = torch.autograd.grad(want, (q, k, v), do)
    got = packed_attention(q, k, v, build_meta(b, backend))
    gg = torch.autograd.grad(got, (q, k, v), do)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    for a, w in zip(gg, gw):
        torch.testing.assert_close(a, w, atol=5e-2, rtol=5e-2)
