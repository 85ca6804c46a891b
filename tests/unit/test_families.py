"""The LLaMA-layout families of the hand-written model (Mistral, Qwen2, Qwen3, and LLaMA itself)
against transformers' own models on the same random weights, in float64 (algebra: the layout,
biases, per-head q/k norms, head_dim), both key-map directions, config.json both ways, the
export keeping the family, and the refusals (unknown model_type, sequences beyond a window)."""
import dataclasses

import numpy as np
import pytest
import torch
from conftest import _float64_norms_and_rope, random_examples, reference_layout, toy_template

from llara_fast.config import FAMILIES, PRESETS, ModelArgs
from llara_fast.data.packing import pack_reference
from llara_fast.errors import UserError
from llara_fast.io.hf import hf_to_ours, ours_to_hf
from llara_fast.model import Transformer

TINY = dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=101, ffn_hidden=64, rope_theta=10000.0)
ARGS = {
    "llama": ModelArgs(**TINY),
    "mistral": ModelArgs(**TINY, family="mistral", sliding_window=4096),
    "qwen2": ModelArgs(**TINY, family="qwen2", qkv_bias=True, tie_embeddings=True),
    "qwen3": ModelArgs(**{**TINY, "dim": 40}, head_dim=16, family="qwen3", qk_norm=True),  # head_dim != dim / heads
}


def hf_model(args: ModelArgs):
    """transformers' model of the family, random weights, float64."""
    from transformers import AutoConfig, AutoModel

    cfg = args.to_hf_config()
    hf_cfg = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "architectures"})
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ref = AutoModel.from_config(hf_cfg).to(torch.float64).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)  # biases too (they start at zero)
    _float64_norms_and_rope(ref)
    return ref


@pytest.mark.parametrize("family", list(ARGS))
def test_matches_transformers_float64(family):
    args = ARGS[family]
    ref = hf_model(args)
    sd = {f"model.{k}": v for k, v in ref.state_dict().items()}
    model = Transformer(dataclasses.replace(args), attn_backend="sdpa").double()
    missing, unexpected = model.load_state_dict(hf_to_ours(sd, args), strict=False)
    assert not unexpected and missing == (["output.weight"] if not args.tie_embeddings else [])
    if not args.tie_embeddings:
        model.output.weight.data.normal_(0, 0.2)
    back = ours_to_hf(model.state_dict())
    assert {k for k in back if k != "lm_head.weight"} == set(sd)  # the key map both ways
    tpl = toy_template(args.vocab_size)
    exs = random_examples(np.random.default_rng(0), [5, 17, 1], args.vocab_size)
    batch = pack_reference(exs, tpl, 10**9)
    with torch.no_grad():
        hidden = model.eval()(batch)  # (N, d)
    cu = batch.cu_seqlens_q.tolist()
    for e, ex in enumerate(exs):
        ids, pos, mask = reference_layout(tpl, ex.text_ids)
        with torch.no_grad():
            want = ref(input_ids=ids, position_ids=pos, attention_mask=mask.double()).last_hidden_state[0]
        got = hidden[cu[2 * e]:cu[2 * e + 2]]
        assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item(), family


@pytest.mark.parametrize("family", list(ARGS))
def test_config_json_both_ways(family):
    args = ARGS[family]
    cfg = args.to_hf_config()
    assert cfg["model_type"] == family and cfg["architectures"] == [FAMILIES[family]]
    assert ModelArgs.from_hf_config(cfg) == args


def test_presets_of_each_family_and_refusals():
    for name in ("mistral-7b", "qwen2.5-1.5b", "qwen3-0.6b"):
        a = PRESETS[name]
        assert ModelArgs.from_hf_config(a.to_hf_config()) == a
    assert 1.4e9 < PRESETS["qwen2.5-1.5b"].num_params() < 1.6e9  # published: 1.54B
    assert 0.5e9 < PRESETS["qwen3-0.6b"].num_params() < 0.8e9    # published: 0.6B (0.44B non-embedding)
    with pytest.raises(UserError, match=r"model_type 'gemma2'.*supported: llama \(LlamaForCausalLM\), mistral"):
        ModelArgs.from_hf_config({**ARGS["llama"].to_hf_config(), "model_type": "gemma2"})
    model = Transformer(dataclasses.replace(ARGS["mistral"], sliding_window=8), attn_backend="sdpa")
    batch = pack_reference(random_examples(np.random.default_rng(1), [20], 101), toy_template(101), 10**9)
    with pytest.raises(UserError, match="exceeds the model's sliding window of 8"):
        model(batch)


def test_export_keeps_the_family(tmp_path):
    """An adapted Qwen2 comes out as a Qwen2 directory that AutoModel loads with no custom code."""
    from transformers import AutoModel

    from llara_fast.encode import Encoder
    from llara_fast.io.export import export
    from llara_fast.io.load import load

    _, tok, _ = load("debug", attn_backend="sdpa")
    args = dataclasses.replace(ARGS["qwen2"], vocab_size=len(tok))
    model = Transformer(args, attn_backend="sdpa")
    model.init_weights(std=0.2, seed=0)
    out = export(model, tok, tmp_path / "qwen2")
    hf = AutoModel.from_pretrained(out, dtype=torch.float32)
    assert type(hf).__name__ == "Qwen2Model" and hf.config.model_type == "qwen2"
    assert torch.equal(hf.layers[0].self_attn.q_proj.bias, model.layers[0].attention.wq.bias)
    again, _, _ = load(str(out), attn_backend="sdpa")
    assert again.args.family == "qwen2" and again.args.qkv_bias
    texts = ["a llama", "Paris is in France."]
    torch.testing.assert_close(Encoder(again, tok).encode_passages(texts), Encoder(model, tok).encode_passages(texts),
                               rtol=0, atol=0)


def test_mistral_directory_loads_in_every_entry_point(tmp_path, capsys):
    """A Mistral-type directory with its own tokenizer files (model_type mistral in config.json)
    loads through load(), the export CLI, evaluate and sentence-transformers in the README's venv,
    where mistral-common is installed without its dependencies: transformers' AutoTokenizer would
    pick mistral-common's backend there and fail on `import tiktoken` (issue 27.10)."""
    import json

    from conftest import write_wiki_beir
    from sentence_transformers import SentenceTransformer

    from llara_fast.encode import Encoder
    from llara_fast.evaluate import main as evaluate_main
    from llara_fast.io.export import export
    from llara_fast.io.export import main as export_main
    from llara_fast.io.load import load

    _, tok, _ = load("debug", attn_backend="sdpa")
    args = dataclasses.replace(ARGS["mistral"], vocab_size=len(tok))
    model = Transformer(args, attn_backend="sdpa")
    model.init_weights(seed=0)
    src = export(model, tok, tmp_path / "mistral")
    assert json.loads((src / "config.json").read_text())["model_type"] == "mistral"
    m2, tok2, _ = load(str(src), attn_backend="sdpa")
    assert tok2("a text", add_special_tokens=False)["input_ids"] == tok("a text", add_special_tokens=False)["input_ids"]
    assert export_main(["--checkpoint", str(src), "--out", str(tmp_path / "again")]) == 0
    ds = write_wiki_beir(tmp_path / "ds", 6, 3)
    assert evaluate_main(["--model", str(src), "--beir", str(ds), "--quiet"]) == 0
    capsys.readouterr()
    st = SentenceTransformer(str(tmp_path / "again"), trust_remote_code=True, device="cpu")
    got = torch.as_tensor(st.encode_document(["a text", "another one"], convert_to_tensor=True))
    want = Encoder(m2, tok2, device="cpu").encode_passages(["a text", "another one"])
    # this checks that it loads and encodes with the same tokenizer and recipe (the embeddings' numerics
    # are test_export's): the same unit vectors up to rounding, far from any other text's
    assert got.shape == want.shape and bool(((got * want).sum(-1) > 0.999).all())
