"""Attention backends against a direct per-example transcription of the DESIGN §1 mask. The
CPU backends check a layout and a mask (algebra), so both sides run in float64 and agree to
rounding of that format (1e-12); GPU backends are compared in bf16 with sdpa."""
import math

import numpy as np
import pytest
import torch
from conftest import random_examples, toy_template
from errmodel import assert_within, attention_tols

from llara_fast.attention import (
    _example_blocks,
    available_backends,
    branch_contexts,
    build_meta,
    flex_mask_tensors,
    packed_attention,
    resolve_backend,
)
from llara_fast.data.packing import pack_encode_reference, pack_reference
from llara_fast.kernels.reference import branch_attention_mask


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


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose: CPU
@pytest.mark.parametrize("backend", ["sdpa", "flex"])  # flex: its eager forward (no CPU backward)
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
def test_cpu_backend_matches_naive(heads, backend):
    H, KV = heads
    rng = np.random.default_rng(0)
    tpl = toy_template(100)
    lens = [3, 17, 0, 9]
    b = pack_reference(random_examples(rng, lens, 100), tpl, 100)
    g = torch.Generator().manual_seed(0)
    N = b.num_tokens
    q, k, v = (torch.randn(N, h, 16, generator=g, dtype=torch.float64) for h in (H, KV, KV))
    got = packed_attention(q, k, v, build_meta(b, backend))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, naive_attention(q, k, v, tpl, lens), atol=1e-12, rtol=1e-12)


def test_sdpa_grads_match_naive():
    """Backward through the masked blocks with grouped-query heads (enable_gqa)."""
    rng = np.random.default_rng(2)
    tpl = toy_template(100)
    lens = [5, 11]
    b = pack_reference(random_examples(rng, lens, 100), tpl, 100)
    g = torch.Generator().manual_seed(2)
    N = b.num_tokens
    q, k, v = (torch.randn(N, h, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (6, 2, 2))
    w = torch.randn(N, 6, 8, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((packed_attention(q, k, v, build_meta(b, "sdpa")) * w).sum(), (q, k, v))
    want = torch.autograd.grad((naive_attention(q, k, v, tpl, lens) * w).sum(), (q, k, v))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)


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
    q, k, v = (torch.randn(b.num_tokens, h, 8, generator=g, dtype=torch.float64) for h in (H, KV, KV))
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
        torch.testing.assert_close(got[sl], want, atol=1e-12, rtol=1e-12)


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert available_backends("cpu") == ["sdpa"]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreted kernels, for tests: opt-in, never auto
    assert available_backends("cpu") == ["sdpa", "triton"] and resolve_backend("auto", "cpu") == "sdpa"
    with pytest.raises(RuntimeError, match="unavailable"):
        resolve_backend("torch_varlen", "cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("xformers", "cpu")


GPU_BACKENDS = [b for b in ("torch_varlen", "flash_attn", "flex", "triton")]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backend_matches_sdpa_bf16(backend):
    """Each GPU backend in bf16, forward and backward, against sdpa's algebra in float64 on the same
    (bf16-valued) inputs, within the worst-case attention bound with bf16 storage (errmodel)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: GPU attention backends are compared with sdpa on a GPU only")
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} is not installed on this machine")
    H, KV, D = 8, 2, 64
    rng = np.random.default_rng(0)
    tpl = toy_template(1000)
    lens = [100, 3, 511, 40]
    b_cpu = pack_reference(random_examples(rng, lens, 1000), tpl, 1000)
    b = b_cpu.to("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b.num_tokens, h, D, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (H, KV, KV))
    do = torch.randn(b.num_tokens, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    got = packed_attention(q, k, v, build_meta(b, backend))
    gg = torch.autograd.grad(got, (q, k, v), do)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    want = packed_attention(q64, k64, v64, build_meta(b_cpu, "sdpa"))
    gw = torch.autograd.grad(want, (q64, k64, v64), do.cpu().double())
    tols = attention_tols(q, k, v, _dense_from_blocks(b_cpu), do, storage=torch.bfloat16)
    for what, a, e, tol in zip(("out", "dq", "dk", "dv"), (got, *gg), (want, *gw), tols):
        assert_within(a.cpu(), e.detach(), tol, f"{backend}: {what}")


def _dense_from_blocks(batch) -> torch.Tensor:
    """The (N, N) allowed-pairs matrix of the sdpa backend's per-example blocks."""
    N = batch.num_tokens
    dense = torch.zeros(N, N, dtype=torch.bool)
    for a, b, mask in _example_blocks(batch):
        dense[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril() if mask is None else mask
    return dense


@pytest.mark.parametrize("layout", ["train", "encode"])
def test_flex_mask_rule_equals_the_segments(layout):
    """flex's (seg, ext) rule allows exactly the pairs the segments allow (all of them: N x N)."""
    rng = np.random.default_rng(5)
    tpl = toy_template(100)
    if layout == "train":
        b = pack_reference(random_examples(rng, [0, 1, 30, 7, 64, 2], 100), tpl, 100)
    else:
        ids = [rng.integers(3, 80, size=n) for n in (1, 12, 5, 40)]
        b, _ = pack_encode_reference(ids, tpl, ["passage", "query", "passage", "query"], 100)
    seg, ext = flex_mask_tensors(b.cu_seqlens_q, b.cu_seqlens_k, b.k_index, b.num_tokens)
    qi, ki = torch.arange(b.num_tokens)[:, None], torch.arange(b.num_tokens)[None, :]
    rule = ((seg[qi] == seg[ki]) & (ki <= qi)) | (ext[ki] == seg[qi])  # (N, N)
    assert torch.equal(rule, _dense_from_blocks(b))
    if layout == "train":  # the branch context really is there: PRED rows see TEXT, not SUM
        assert (ext >= 0).sum() == sum(len(tpl.prefix_ids) + t for t in (0, 1, 30, 7, 64, 2))


def _layouts(layout):
    rng = np.random.default_rng(5)
    tpl = toy_template(100)
    if layout == "train":
        return pack_reference(random_examples(rng, [0, 1, 30, 7, 64, 2], 100), tpl, 100)
    ids = [rng.integers(3, 80, size=n) for n in (1, 12, 5, 40)]
    return pack_encode_reference(ids, tpl, ["passage", "query", "passage", "query"], 100)[0]


@pytest.mark.parametrize("layout", ["train", "encode"])
def test_branch_contexts_equal_the_segments(layout):
    """The triton backend's (segment, context range) rule allows exactly the pairs the segments allow."""
    b = _layouts(layout)
    c0, c1, max_ctx = branch_contexts(b.cu_seqlens_q, b.cu_seqlens_k, b.k_index, b.num_tokens)
    assert torch.equal(branch_attention_mask(b.cu_seqlens_q, c0, c1), _dense_from_blocks(b))
    assert max_ctx == (len(toy_template(100).prefix_ids) + 64 if layout == "train" else 0)


@pytest.mark.parametrize("layout", ["train", "encode"])
def test_triton_backend_matches_sdpa(layout):
    """The Triton kernel (interpreted on a CPU, compiled on a GPU) on packed batches, fp32 with
    grouped-query heads, forward and backward, against sdpa in float64 within the attention
    rounding bound."""
    b = _layouts(layout)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    N = b.num_tokens
    q, k, v = (torch.randn(N, h, 16, generator=g, requires_grad=True) for h in (6, 2, 2))
    do = torch.randn(N, 6, 16, generator=g)
    on_dev = [t.detach().to(dev).requires_grad_() for t in (q, k, v)]
    out = packed_attention(*on_dev, build_meta(b.to(dev), "triton"))
    got, got_grads = out.cpu(), [x.cpu() for x in torch.autograd.grad(out, on_dev, do.to(dev))]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = packed_attention(q64, k64, v64, build_meta(b, "sdpa"))
    want_grads = torch.autograd.grad(want, (q64, k64, v64), do.double())
    tols = attention_tols(q, k, v, _dense_from_blocks(b), do)
    for what, a, e, tol in zip(("out", "dq", "dk", "dv"), (got, *got_grads), (want, *want_grads), tols):
        assert_within(a, e.detach(), tol, what)


def test_triton_refuses_scattered_contexts():
    """Outside keys that are not one run of consecutive tokens, or that are the segment's own
    queries, are not a context range."""
    cu, cu_k = torch.tensor([0, 4, 6]), torch.tensor([0, 4, 8])
    with pytest.raises(ValueError, match="triton backend: a segment's outside keys"):
        branch_contexts(cu, cu_k, torch.tensor([0, 1, 2, 3, 0, 2, 4, 5]), 6)  # context 0, 2: a gap
    cu, cu_k = torch.tensor([0, 3, 6]), torch.tensor([0, 3, 7])
    with pytest.raises(ValueError, match="triton backend"):
        branch_contexts(cu, cu_k, torch.tensor([0, 1, 2, 3, 3, 4, 5]), 6)  # its own first query as context
    with pytest.raises(ValueError, match="k_index holds 0..9, outside the stream's 6 tokens"):
        branch_contexts(cu, cu_k, torch.tensor([0, 1, 2, 9, 3, 4, 5]), 6)  # a key past the stream


def test_flex_refuses_other_key_layouts():
    """A segment whose key list does not end with its own queries cannot be expressed by the rule."""
    cu = torch.tensor([0, 3, 6])
    k_index = torch.tensor([0, 1, 2, 0, 4, 5, 3])  # segment 1's keys: 0, 4, 5, 3 (its queries 3..5 out of order)
    with pytest.raises(ValueError, match="flex backend"):
        flex_mask_tensors(cu, torch.tensor([0, 3, 7]), k_index, 6)
    shared = torch.tensor([0, 1, 2, 0, 3, 0, 4])  # token 0 an outside key of two segments
    with pytest.raises(ValueError, match="flex backend"):
        flex_mask_tensors(torch.tensor([0, 3, 4, 5]), torch.tensor([0, 3, 5, 7]), shared, 5)
    with pytest.raises(ValueError, match="triton backend"):  # the same check
        branch_contexts(torch.tensor([0, 3, 4, 5]), torch.tensor([0, 3, 5, 7]), shared, 5)


def test_backends_refuse_tokens_outside_every_segment():
    """The stream has no padding: segments that leave tokens uncovered are a malformed batch
    (the blocks must tile the stream for the split/cat in _sdpa)."""
    from types import SimpleNamespace

    for cu in ([1, 4], [0, 4]):  # a token before the first segment; tokens after the last
        b = SimpleNamespace(cu_seqlens_q=torch.tensor(cu), cu_seqlens_k=torch.tensor([0, cu[1] - cu[0]]),
                            k_index=torch.arange(cu[0], cu[1]), input_ids=torch.zeros(7, dtype=torch.long))
        with pytest.raises(ValueError, match="malformed PackedBatch: its segments cover tokens"):
            build_meta(b, "sdpa")
        with pytest.raises(ValueError, match="malformed PackedBatch: its segments cover tokens"):
            flex_mask_tensors(b.cu_seqlens_q, b.cu_seqlens_k, b.k_index, 7)
        with pytest.raises(ValueError, match="malformed PackedBatch: its segments cover tokens"):
            branch_contexts(b.cu_seqlens_q, b.cu_seqlens_k, b.k_index, 7)
