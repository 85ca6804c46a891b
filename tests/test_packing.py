"""The Python reference packer: the PackedBatch invariants of DESIGN §3."""
import numpy as np
import pytest
import torch

from conftest import random_examples, toy_template
from llara_fast.data.packing import example_num_tokens, greedy_groups, pack_greedy_reference, pack_reference


@pytest.mark.parametrize("n_special", [1, 8])
@pytest.mark.parametrize("seed", range(5))
def test_invariants(n_special, seed):
    rng = np.random.default_rng(seed)
    vocab = 200
    tpl = toy_template(vocab, n_special)
    max_len = int(rng.integers(1, 40))
    exs = random_examples(rng, rng.integers(0, 60, size=int(rng.integers(1, 7))), vocab)
    b = pack_reference(exs, tpl, max_len)
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
