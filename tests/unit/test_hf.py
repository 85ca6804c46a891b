"""HF checkpoints: key map round trip, sharding, GGUF, tokenizers, special tokens, errors."""
import json
from pathlib import Path

import pytest
import torch
from errmodel import assert_within, mean_tol

from llara_fast.config import ModelArgs
from llara_fast.io.hf import (
    add_special_tokens,
    grow_embeddings,
    load_hf_model,
    load_tokenizer,
    read_safetensors,
    save_hf_dir,
)
from llara_fast.model import Transformer
from llara_fast.templates import SPECIAL_TOKENS, Template


def _tiny(tie=False):
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=90, ffn_hidden=40,
                              tie_embeddings=tie))
    m.init_weights(seed=3)
    return m


@pytest.mark.parametrize("tie", [False, True])
def test_roundtrip_and_transformers_loads(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    m = _tiny(tie)
    save_hf_dir(m, tmp_path)
    back = load_hf_model(tmp_path)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(hf.model.embed_tokens.weight, m.tok_embeddings.weight, rtol=0, atol=0)
    torch.testing.assert_close(hf.lm_head.weight, m.lm_head_weight, rtol=0, atol=0)
    torch.testing.assert_close(hf.model.layers[1].mlp.down_proj.weight, m.layers[1].feed_forward.w2.weight,
                               rtol=0, atol=0)


def test_sharded(tmp_path):
    m = _tiny()
    save_hf_dir(m, tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    back = load_hf_model(tmp_path)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="shard listed"):
        read_safetensors(tmp_path)


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_model(tmp_path)
    m = _tiny()
    save_hf_dir(m, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "other.bin")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf_model(tmp_path)
    (tmp_path / "other.bin").rename(tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight has shape .* implies"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma2",
                                                      "architectures": ["Gemma2ForCausalLM"]}))
    with pytest.raises(ValueError, match="model_type 'gemma2' .* is not supported"):
        load_hf_model(tmp_path)


def test_grow_embeddings_mean_rows():
    m = _tiny(tie=False)
    emb, head = m.tok_embeddings.weight.detach().clone(), m.output.weight.detach().clone()
    grow_embeddings(m, 106)
    assert m.args.vocab_size == 106 and m.tok_embeddings.weight.shape == (106, 32)
    torch.testing.assert_close(m.tok_embeddings.weight[:90], emb, rtol=0, atol=0)
    for new, old in ((m.tok_embeddings.weight[90:], emb), (m.output.weight[90:], head)):  # fp32 means of 90 rows
        assert_within(new, old.double().mean(0).expand(16, -1), mean_tol(old), "new rows")


def test_sentencepiece_tokenizer():
    from llara_fast.data.sources import sentencepiece_model_path

    tok = load_tokenizer(sentencepiece_model_path())
    assert len(tok) == 32000
    assert tok('"')["input_ids"][0] == tok.bos_token_id  # LLaMA: BOS prepended to the prefix
    with pytest.raises(ValueError, match="lacks the LLaRA special tokens"):
        Template.from_tokenizer(tok)
    ids = add_special_tokens(tok)
    assert ids == list(range(32000, 32016))
    assert add_special_tokens(tok) == ids  # idempotent
    tpl = Template.from_tokenizer(tok)
    assert [tpl.sum_ids[o] for o in tpl.sum_special_offsets] == ids[:8]
    assert [tpl.pred_ids[o] for o in tpl.pred_special_offsets] == ids[8:]
    assert tok.bos_token_id in tpl.excluded_target_ids


def test_smollm2_preset_and_gguf(smollm2):
    """The cached conversion equals transformers' own GGUF load; 16 new rows = mean of the old."""
    from transformers import AutoModelForCausalLM

    from llara_fast.io.hf import smollm2_gguf_path

    model, tok, tpl = smollm2
    assert len(tok) == 49168 and model.args.vocab_size == 49168
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(49152, 49168))
    assert tpl.prefix_ids == tuple(tok('"')["input_ids"]) and len(tpl.sum_ids) == 18 and len(tpl.pred_ids) == 18
    gguf = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    w = hf.model.embed_tokens.weight
    torch.testing.assert_close(model.tok_embeddings.weight[:49152], w, rtol=0, atol=0)
    assert_within(model.tok_embeddings.weight[49152:], w.double().mean(0).expand(16, -1), mean_tol(w), "new rows")
    torch.testing.assert_close(model.layers[7].attention.wk.weight, hf.model.layers[7].self_attn.k_proj.weight,
                               rtol=0, atol=0)
    assert model.output is None  # tied


def test_load_layers_and_random_init(smollm2):
    """`layers` keeps the first L real blocks; `random_init` gives the preset's shape with fresh
    weights (built with L blocks directly) and the same tokenizer; bad values are refused."""
    from llara_fast.io.load import load

    real = smollm2[0]
    cut, tok, _ = load("smollm2-135m", attn_backend="sdpa", layers=2)
    assert len(cut.layers) == cut.args.n_layers == 2 and len(tok) == 49168
    torch.testing.assert_close(cut.layers[1].attention.wq.weight, real.layers[1].attention.wq.weight, rtol=0, atol=0)
    torch.testing.assert_close(cut.norm.weight, real.norm.weight, rtol=0, atol=0)

    rnd, tok2, _ = load("smollm2-135m", attn_backend="sdpa", random_init=True, layers=3, seed=1)
    assert len(rnd.layers) == rnd.args.n_layers == 3 and rnd.args.weights is None
    assert rnd.args.dim == real.args.dim and rnd.args.vocab_size == real.args.vocab_size == len(tok2)
    assert not torch.equal(rnd.layers[0].attention.wq.weight, real.layers[0].attention.wq.weight)
    assert float(rnd.layers[0].attention.wq.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    again, _, _ = load("smollm2-135m", attn_backend="sdpa", random_init=True, layers=3, seed=1)
    torch.testing.assert_close(again.tok_embeddings.weight, rnd.tok_embeddings.weight, rtol=0, atol=0)

    with pytest.raises(ValueError, match=r"layers must be in 1\.\.30"):
        load("smollm2-135m", layers=31)
    with pytest.raises(ValueError, match=r"layers must be in 1\.\.2"):
        load("debug", layers=5)
    with pytest.raises(ValueError, match="random_init takes a preset"):
        load(str(Path(__file__).parent), random_init=True)
