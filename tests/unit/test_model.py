"""The packed model against HF transformers run on each example alone (DESIGN §1 layout).

These check algebra (the layout, the masks, RoPE, GQA, the norms), so both sides run in float64
and agree to that format's rounding: 1e-10 of the largest hidden value, where fp32 rounding
(~1e-6) or a wrong mask, position or weight (>= 1e-3) would be far outside."""
import copy

import numpy as np
import pytest
import torch
from conftest import hf_reference_model, random_examples, reference_layout, toy_template

from llara_fast.batch import Example
from llara_fast.config import ModelArgs
from llara_fast.data.packing import pack_reference
from llara_fast.model import Transformer


def _check_against_hf(model, template, examples, max_len=10**9):
    assert model.tok_embeddings.weight.dtype == torch.float64
    batch = pack_reference(examples, template, max_len)
    with torch.no_grad():
        hidden = model(batch)  # (N, d)
    ref = hf_reference_model(model)
    cu = batch.cu_seqlens_q.tolist()
    for e, ex in enumerate(examples):
        ids, pos, mask = reference_layout(template, ex.text_ids[:max_len])
        with torch.no_grad():
            want = ref(input_ids=ids, position_ids=pos, attention_mask=mask.double()).last_hidden_state[0]  # (L, d)
        got = hidden[cu[2 * e]:cu[2 * e + 2]]
        assert got.shape == want.shape
        err = (got - want).abs().max().item()
        assert err <= 1e-10 * want.abs().max().item(), f"example {e}: max abs err {err}"


@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}])
def test_tiny_random_gqa_untied_matches_hf(scaling):
    torch.manual_seed(0)
    args = ModelArgs(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=101, ffn_hidden=77,
                     rope_theta=500.0, rope_scaling=scaling, tie_embeddings=False)
    model = Transformer(args, attn_backend="sdpa")
    model.init_weights(std=0.2, seed=1)
    model.double()
    tpl = toy_template(101)
    exs = random_examples(np.random.default_rng(0), [5, 23, 1, 40], 101)
    _check_against_hf(model, tpl, exs)
    # truncation to max_len goes through the same path
    _check_against_hf(model, tpl, exs, max_len=17)


def test_smollm2_matches_hf(smollm2, wiki_texts):
    fp32, tok, tpl = smollm2
    model = copy.deepcopy(fp32).double()
    exs = []
    for text in wiki_texts[:3]:
        ids = np.array(tok(text, add_special_tokens=False)["input_ids"][:120])
        exs.append(Example(ids, np.array([], dtype=np.int64), np.array([], dtype=np.int64)))
    assert len({len(e.text_ids) for e in exs}) == 3
    _check_against_hf(model, tpl, exs)


@pytest.fixture(scope="module")
def wiki_texts():
    from llara_fast.data.sources import iter_wiki_sample

    texts = [t for _, t in iter_wiki_sample()]
    return [texts[0][:300], texts[1][:700], texts[2][:150]]


# ---- branch semantics ----------------------------------------------------------------------
FAMILY_ARGS = {  # the branch semantics hold for every family (issue: bases)
    "llama": {},
    "mistral": {"family": "mistral", "sliding_window": 4096},
    "qwen2": {"family": "qwen2", "qkv_bias": True},
    "qwen3": {"family": "qwen3", "qk_norm": True, "head_dim": 12},
}


def _tiny(seed=0, family="llama"):
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden=40, **FAMILY_ARGS[family])
    m = Transformer(args, attn_backend="sdpa")
    m.init_weights(std=0.3, seed=seed)
    if args.qkv_bias:
        with torch.no_grad():
            for layer in m.layers:
                for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv):
                    lin.bias.normal_(0, 0.3)  # biases start at zero; make them matter
    return m.double().eval()  # float64: invariances below hold to its rounding, whatever the BLAS


def _segments(batch, e):
    cu = batch.cu_seqlens_q.tolist()
    return slice(cu[2 * e], cu[2 * e + 1]), slice(cu[2 * e + 1], cu[2 * e + 2])


@pytest.mark.parametrize("family", list(FAMILY_ARGS))
def test_pred_ignores_sum(family):
    model = _tiny(family=family)
    tpl = toy_template(64)
    exs = random_examples(np.random.default_rng(1), [9, 14], 64)
    b1 = pack_reference(exs, tpl, 100)
    b2 = pack_reference(exs, tpl, 100)
    main, branch = _segments(b1, 1)
    P, T = len(tpl.prefix_ids), 14
    sum_tokens = torch.arange(main.start + P + T, main.stop)
    b2.input_ids[sum_tokens[:3]] = torch.tensor([20, 21, 22])  # change SUM's words
    with torch.no_grad():
        h1, h2 = model(b1), model(b2)
    assert not torch.allclose(h1[sum_tokens], h2[sum_tokens])  # the change is visible where it should be
    torch.testing.assert_close(h1[branch], h2[branch], rtol=0, atol=0)
    torch.testing.assert_close(h1[main.start:main.start + P + T], h2[main.start:main.start + P + T], rtol=0, atol=0)


@pytest.mark.parametrize("family", list(FAMILY_ARGS))
def test_main_ignores_pred(family):
    model = _tiny(family=family)
    tpl = toy_template(64)
    exs = random_examples(np.random.default_rng(2), [11], 64)
    b1, b2 = pack_reference(exs, tpl, 100), pack_reference(exs, tpl, 100)
    main, branch = _segments(b1, 0)
    b2.input_ids[branch.start:branch.start + 2] = torch.tensor([30, 31])
    with torch.no_grad():
        h1, h2 = model(b1), model(b2)
    assert not torch.allclose(h1[branch], h2[branch])
    torch.testing.assert_close(h1[main], h2[main], rtol=0, atol=0)


@pytest.mark.parametrize("family", list(FAMILY_ARGS))
def test_examples_are_independent(family):
    model = _tiny(family=family)
    tpl = toy_template(64)
    rng = np.random.default_rng(3)
    exs = random_examples(rng, [7, 12, 5], 64)
    other = random_examples(rng, [19], 64)[0]
    b1 = pack_reference(exs, tpl, 100)
    b2 = pack_reference([exs[0], other, exs[2]], tpl, 100)
    alone = pack_reference([exs[2]], tpl, 100)
    with torch.no_grad():
        h1, h2, h3 = model(b1), model(b2), model(alone)
    m0, br0 = _segments(b1, 0)
    torch.testing.assert_close(h1[m0.start:br0.stop], h2[m0.start:br0.stop], rtol=0, atol=0)
    s1, e1 = _segments(b1, 2)
    s2, e2 = _segments(b2, 2)
    torch.testing.assert_close(h1[s1.start:e1.stop], h2[s2.start:e2.stop], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h1[s1.start:e1.stop], h3, rtol=1e-12, atol=1e-12)


def test_inference_path_equals_training_path():
    """Without autograd (encoding) RoPE writes its halves in place instead of concatenating them:
    the same products and sums, so the hidden states are the training path's bit for bit."""
    torch.manual_seed(0)
    args = ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=101, ffn_hidden=77)
    model = Transformer(args, attn_backend="sdpa")
    model.init_weights(std=0.2, seed=1)
    batch = pack_reference(random_examples(np.random.default_rng(0), [5, 23, 40], 101), toy_template(101), 10**9)
    with torch.inference_mode():
        fast = model(batch)  # (N, d)
    slow = model(batch)  # (N, d), through the autograd path
    assert slow.requires_grad
    assert torch.equal(fast, slow.detach())
