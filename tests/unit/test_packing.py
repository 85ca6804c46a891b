"""The packers: the PackedBatch invariants of DESIGN §3 (Python reference), and the C++ packer
against the reference."""
import warnings
from dataclasses import fields

import numpy as np
import pytest
import torch
from conftest import random_examples, toy_template

import llara_fast
from llara_fast.data import native
from llara_fast.data.native import (
    NativePacker,
    examples_to_source,
    greedy_offsets,
    native_packer_available,
    pack,
    pack_greedy,
)
from llara_fast.data.packing import example_num_tokens, greedy_groups, pack_greedy_reference, pack_reference

needs_native = pytest.mark.skipif(not native_packer_available(), reason="llara_fast._C is not built")


@pytest.mark.parametrize("n_special", [1, 8])
@pytest.mark.parametrize("seed", range(5))
def test_invariants(n_special, seed):
    rng = np.random.default_rng(seed)
    vocab = 200
    tpl = toy_template(vocab, n_special)
    max_len = int(rng.integers(1, 40))
    exs = random_examples(rng, rng.integers(0, 60, size=int(rng.integers(1, 7))), vocab)
    check_invariants(pack_reference(exs, tpl, max_len), exs, tpl, max_len)


def check_invariants(b, exs, tpl, max_len):
    P, S, R = len(tpl.prefix_ids), len(tpl.sum_ids), len(tpl.pred_ids)
    cu_q, cu_k = b.cu_seqlens_q.tolist(), b.cu_seqlens_k.tolist()
    assert b.cu_seqlens_q.dtype == torch.int32 and b.cu_seqlens_k.dtype == torch.int32
    assert len(cu_q) == 2 * len(exs) + 1 and cu_q[-1] == b.num_tokens and cu_k[-1] == len(b.k_index)
    assert b.max_seqlen_q == max(np.diff(cu_q)) and b.max_seqlen_k == max(np.diff(cu_k))
    lm_seen = 0
    for e, ex in enumerate(exs):
        T = min(len(ex.text_ids), max_len)
        m0, m1, b1 = cu_q[2 * e], cu_q[2 * e + 1], cu_q[2 * e + 2]
        assert (m1 - m0, b1 - m1) == (P + T + S, R)
        ids = b.input_ids[m0:b1].tolist()
        assert ids == list(tpl.prefix_ids) + ex.text_ids[:T].tolist() + list(tpl.sum_ids) + list(tpl.pred_ids)
        # positions restart per example; PRED restarts right after TEXT
        assert b.position_ids[m0:m1].tolist() == list(range(P + T + S))
        assert b.position_ids[m1:b1].tolist() == list(range(P + T, P + T + R))
        # keys: main sees itself; branch sees PREFIX..TEXT then PRED; nothing outside the example
        assert b.k_index[cu_k[2 * e]:cu_k[2 * e + 1]].tolist() == list(range(m0, m1))
        assert b.k_index[cu_k[2 * e + 1]:cu_k[2 * e + 2]].tolist() == list(range(m0, m0 + P + T)) + list(range(m1, b1))
        # special positions hold the right tokens
        assert b.input_ids[b.sum_positions[e]].tolist() == [tpl.sum_ids[o] for o in tpl.sum_special_offsets]
        assert b.input_ids[b.pred_positions[e]].tolist() == [tpl.pred_ids[o] for o in tpl.pred_special_offsets]
        assert b.sum_ids[b.sum_offsets[e]:b.sum_offsets[e + 1]].tolist() == ex.sum_targets.tolist()
        assert b.pred_ids[b.pred_offsets[e]:b.pred_offsets[e + 1]].tolist() == ex.pred_targets.tolist()
        # LM: the token before each TEXT token predicts it
        lp = b.lm_positions[lm_seen:lm_seen + T]
        assert lp.tolist() == list(range(m0 + P - 1, m0 + P - 1 + T))
        assert b.input_ids[lp + 1].tolist() == b.lm_targets[lm_seen:lm_seen + T].tolist()
        lm_seen += T
    assert lm_seen == len(b.lm_positions)
    pairs = sum(lq * (lk - lq) + lq * (lq + 1) // 2 for lq, lk in zip(np.diff(cu_q), np.diff(cu_k)))
    assert b.attn_pairs() == pairs


def test_greedy_budget():
    rng = np.random.default_rng(0)
    tpl = toy_template(100)
    exs = random_examples(rng, rng.integers(1, 50, size=40), 100)
    budget = 120
    batches = pack_greedy_reference(exs, tpl, 30, budget)
    assert sum(b.num_examples for b in batches) == 40
    assert all(b.num_tokens <= budget for b in batches)
    lens = [example_num_tokens(len(e.text_ids), tpl, 30) for e in exs]
    # greedy: each batch could not have taken the next example
    i = 0
    for b in batches[:-1]:
        i += b.num_examples
        assert b.num_tokens + lens[i] > budget
    with pytest.raises(ValueError, match="token budget"):
        list(greedy_groups([10, 500], 100))


# ---- the C++ packer ------------------------------------------------------------------------------
def assert_same_batch(a, b):
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, (f.name, x.dtype, y.dtype, x.shape, y.shape)
            assert torch.equal(x, y), f.name
        else:
            assert type(x) is type(y) and x == y, f.name


def _random_case(rng, n_special):
    vocab = int(rng.choice([120, 300, 70000]))  # 70000: ids beyond uint16
    tpl = toy_template(vocab, n_special, prefix=tuple(rng.integers(0, 3, size=int(rng.integers(1, 4)))))
    n = int(rng.integers(1, 60))
    lengths = rng.integers(0, 80, size=n)
    lengths[rng.random(n) < 0.15] = 0  # empty text
    exs = random_examples(rng, lengths, vocab, n_targets=(0, int(rng.integers(1, 30))))
    for e in exs:  # force some empty target sets
        if rng.random() < 0.2:
            e.sum_targets = e.sum_targets[:0]
        if rng.random() < 0.2:
            e.pred_targets = e.pred_targets[:0]
    max_len = int(rng.integers(0, 90))
    fixed = len(tpl.prefix_ids) + len(tpl.sum_ids) + len(tpl.pred_ids)
    budget = int(fixed + max_len + rng.integers(0, 400))
    return tpl, exs, max_len, budget


@needs_native
@pytest.mark.parametrize("n_special", [1, 8])
@pytest.mark.parametrize("seed", range(12))
def test_native_matches_reference(n_special, seed):
    """Property test: random lengths (empty text included), budgets, max_len (0 included),
    empty target sets, prefixes of 1-3 tokens, n_special 1 and 8."""
    rng = np.random.default_rng(1000 + seed)
    tpl, exs, max_len, budget = _random_case(rng, n_special)
    ref = pack_greedy_reference(exs, tpl, max_len, budget)
    got = pack_greedy(exs, tpl, max_len, budget, n_threads=int(rng.integers(1, 5)), native=True)
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        assert_same_batch(a, b)
    i = 0
    for b in got:
        check_invariants(b, exs[i:i + b.num_examples], tpl, max_len)
        i += b.num_examples
    assert_same_batch(pack_reference(exs, tpl, max_len), pack(exs, tpl, max_len, native=True))


@needs_native
@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint32, np.int64])
def test_native_reads_shard_dtypes_and_several_sources(dtype):
    rng = np.random.default_rng(7)
    tpl = toy_template(300)
    exs = random_examples(rng, rng.integers(0, 50, size=30), 300)
    packer = NativePacker(tpl, 40)
    srcs = []
    for part in (exs[:13], exs[13:]):  # two sources, as two shards
        text, toff, st, soff, pt, poff = examples_to_source(part)
        srcs.append((text.astype(dtype), toff, st.astype(dtype), soff, pt.astype(dtype), poff))
    order = rng.permutation(30)
    src = (order >= 13).astype(np.int64)
    local = np.where(order >= 13, order - 13, order)
    offs = greedy_offsets(packer.token_counts([len(exs[i].text_ids) for i in order]), 200)
    got = packer.pack(srcs, src, local, offs)
    ref = pack_greedy_reference([exs[i] for i in order], tpl, 40, 200)
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        assert_same_batch(a, b)


@needs_native
def test_native_rejects_bad_references():
    tpl = toy_template(100)
    exs = random_examples(np.random.default_rng(0), [5, 6], 100)
    packer = NativePacker(tpl, 10)
    src = [examples_to_source(exs)]
    with pytest.raises(ValueError, match="out of range"):
        packer.pack(src, np.array([0, 0]), np.array([0, 2]), np.array([0, 2]))
    with pytest.raises(ValueError, match="source 1 out of range"):
        packer.pack(src, np.array([1]), np.array([0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="empty"):
        packer.pack(src, np.array([0, 0]), np.array([0, 1]), np.array([0, 0, 2]))
    text, toff, *rest = src[0]
    with pytest.raises(ValueError, match="corrupt text offsets"):
        packer.pack([(text, toff + 100, *rest)], np.array([0]), np.array([1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="dtype"):
        packer.pack([(text.astype(np.float32), toff, *rest)], np.array([0]), np.array([0]), np.array([0, 1]))


@pytest.mark.parametrize("max_groups", [0, 1, 3])
def test_greedy_offsets_match_greedy_groups(max_groups):
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 60, size=200)
    full = [0]
    for g in greedy_groups(counts.tolist(), 100):
        full.append(full[-1] + len(g))
    got = greedy_offsets(counts, 100, max_groups).tolist()
    assert got == (full if max_groups == 0 else full[:max_groups + 1])
    assert greedy_offsets(counts[:3], 1000, 2).tolist() == [0, 3]  # ran out: the last group closes at the end
    with pytest.raises(ValueError, match="token budget"):
        greedy_offsets(np.array([10, 500]), 100)


def test_fallback_without_extension(monkeypatch):
    """No extension: one clear warning, then the reference packer's output."""
    monkeypatch.setattr(llara_fast, "_C", None)
    monkeypatch.setattr(native, "_FALLBACK_SAID", False)
    rng = np.random.default_rng(5)
    tpl = toy_template(100)
    exs = random_examples(rng, rng.integers(0, 30, size=10), 100)
    with pytest.warns(RuntimeWarning, match="not built"):
        got = pack_greedy(exs, tpl, 20, 120)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only
        pack(exs, tpl, 20)
    for a, b in zip(pack_greedy_reference(exs, tpl, 20, 120), got):
        assert_same_batch(a, b)
    assert greedy_offsets(np.array([5, 5, 5]), 10).tolist() == [0, 2, 3]
    with pytest.raises(RuntimeError, match="not built"):
        pack(exs, tpl, 20, native=True)
