"""HF export: layout, untrained-export equality, dtypes and shards, the model card's encode
recipe through plain transformers against llara_fast's packed encoder, the checkpoint hook.

Embeddings of the export (padded, transformers / sentence-transformers) and of llara_fast's packed
encoder differ in algebra only: both run in float64, and the encoder's final rounding to fp32
is the difference (errmodel.EMB_ATOL)."""
import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import _float64_norms_and_rope
from errmodel import EMB_ATOL, assert_within, mean_tol, pooled_unit_tol

from llara_fast.config import ModelArgs
from llara_fast.encode import Encoder
from llara_fast.io.export import ExportOptions, export, main, parse_size
from llara_fast.io.hf import load_tokenizer, read_safetensors, resolve_source, save_hf_dir
from llara_fast.io.load import load
from llara_fast.model import Transformer
from llara_fast.templates import SPECIAL_TOKENS

TEXTS = ["The llama is a domesticated South American camelid, widely used as a meat and pack animal.",
         "Paris is the capital of France.",
         "Dense retrieval encodes queries and passages into vectors; nearest neighbours are found by inner "
         "product. Large language models can be adapted into such encoders " * 3,
         ""]
QUERIES = ["What is a llama?", "capital of France", "how does dense retrieval work"]


@pytest.fixture(scope="module")
def base_tokenizer():
    """SmolLM2's tokenizer as shipped: no <s1>..<s16>."""
    return load_tokenizer(resolve_source("smollm2-135m"))


def _tiny_source(tmp_path, tok, tie=False):
    """An HF directory of a tiny random LLaMA over the SmolLM2 vocabulary (no LLaRA tokens yet)."""
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=len(tok), ffn_hidden=48,
                              rope_theta=100000.0, tie_embeddings=tie))
    m.init_weights(seed=5)
    src = tmp_path / "src"
    save_hf_dir(m, src, tok)
    return src


# ---- the card's recipe, written out independently (mirrors README.md of the export) ------------
def card_states(texts, kind, model, tokenizer, max_length=512):
    """(B, 8, d) final hidden states of the 8 special tokens, in the model's dtype."""
    prefix = '"'
    suffix = ('", summarize the above passage within eight words: <s1><s2><s3><s4><s5><s6><s7><s8>'
              if kind == "passage" else
              '", predict the following passage within eight words: <s9><s10><s11><s12><s13><s14><s15><s16>')
    prefix_ids = tokenizer(prefix)["input_ids"]
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    rows = []
    for t in texts:
        ids = prefix_ids + tokenizer(t, max_length=max_length, truncation=True, add_special_tokens=False)["input_ids"] \
            + suffix_ids
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    inputs = tokenizer.pad(rows, padding=True, pad_to_multiple_of=8, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]  # (B, L, d)
    return hidden[:, -8:, :]


def card_encode(texts, kind, model, tokenizer, max_length=512):
    """The card's pooling, in the model's dtype (fp32 at least; the card itself writes .float())."""
    states = card_states(texts, kind, model, tokenizer, max_length)
    return torch.nn.functional.normalize(states.to(torch.promote_types(states.dtype, torch.float32)).mean(1), dim=-1)


def _float64(model, tok, **kw) -> Encoder:
    """llara_fast's encoder on a float64 copy of the model."""
    return Encoder(copy.deepcopy(model).double(), tok, device="cpu", dtype=torch.float64, **kw)


def _st64(path):
    """The export in sentence-transformers, computing in float64 (norms and RoPE too)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(path), trust_remote_code=True, device="cpu", model_kwargs={"dtype": torch.float64})
    _float64_norms_and_rope(st[0].model)
    return st


def _assert_emb(got, want, what=""):
    """Two embeddings of the same float64 algebra, at least one rounded to fp32 (EMB_ATOL)."""
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=EMB_ATOL, msg=lambda m: f"{what}: {m}")


def test_untrained_export_is_source_plus_16_rows(tmp_path, base_tokenizer):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    src = _tiny_source(tmp_path, base_tokenizer)
    out = tmp_path / "out"
    assert main(["--checkpoint", str(src), "--out", str(out)]) == 0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "README.md", "llara_fast.json"):
        assert (out / f).is_file(), f
    a, b = read_safetensors(src), read_safetensors(out)
    assert set(a) == set(b)
    V = len(base_tokenizer)
    for k in a:
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert b[k].shape == (V + 16, a[k].shape[1])
            torch.testing.assert_close(b[k][:V], a[k], rtol=0, atol=0)
            assert_within(b[k][V:], a[k].double().mean(0, keepdim=True).expand(16, -1), mean_tol(a[k]), k)
        else:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(V, V + 16))
    assert tok.padding_side == "left" and tok.pad_token is not None
    lm = AutoModelForCausalLM.from_pretrained(out)
    assert lm.dtype == torch.float32 and lm.config.vocab_size == V + 16
    torch.testing.assert_close(lm.lm_head.weight, b["lm_head.weight"], rtol=0, atol=0)
    assert type(AutoModel.from_pretrained(out)).__name__ == "LlamaModel"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
    meta = json.loads((out / "llara_fast.json").read_text())
    assert meta["prompts"]["n_special"] == 8 and meta["sum_ids"][-8:] == list(range(V, V + 8))
    card = (out / "README.md").read_text()
    assert "add_special_tokens=False" in card and "would drop a real token" in card
    assert "from `src`" in card and str(tmp_path) not in card  # a card is published: no local paths


def test_card_source_has_no_local_layout():
    from llara_fast.io.export import public_source

    assert public_source("/data/me/runs/a/checkpoints/step_0000012 + llara_fast.finetune") == (
        "a/checkpoints/step_0000012 + llara_fast.finetune")
    assert public_source("/data/me/models/base (step 4, best ndcg@10)") == "base (step 4, best ndcg@10)"
    for kept in ("smollm2-135m + llara_fast.pretrain", "ORG/NAME", "runs/default/checkpoints/step_0000012"):
        assert public_source(kept) == kept


def test_export_bf16_sharded_tied(tmp_path, base_tokenizer):
    from transformers import AutoModelForCausalLM

    src = _tiny_source(tmp_path, base_tokenizer, tie=True)
    out = tmp_path / "out"
    assert main(["--checkpoint", str(src), "--out", str(out), "--dtype", "bf16", "--max-shard-size", "1MB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "lm_head.weight" not in index["weight_map"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    lm = AutoModelForCausalLM.from_pretrained(out)
    assert lm.dtype == torch.bfloat16
    src_w = read_safetensors(src)["model.layers.1.mlp.up_proj.weight"]
    torch.testing.assert_close(lm.model.layers[1].mlp.up_proj.weight, src_w.bfloat16(), rtol=0, atol=0)
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()


def test_export_errors(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    assert main(["--checkpoint", "debug", "--out", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "x").read_text() == "keep me"
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000010"
    ckpt.mkdir(parents=True)
    (ckpt / ".metadata").write_bytes(b"")
    with pytest.raises(ValueError, match="COMPLETE"):
        load(ckpt)
    (ckpt / "COMPLETE").write_text("{}")
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o2")]) == 2
    assert "config.toml: missing" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o3")]) == 2
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.e2e
def test_export_training_checkpoint(tmp_path):
    """A real checkpoint of llara_fast.pretrain (debug preset, one step) exports to exactly its
    DCP weights, and the encoder reads it directly."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from llara_fast.data.prepare import PrepareOptions, prepare
    from llara_fast.io.hf import ours_to_hf

    prepare(None, "wiki-sample", str(resolve_source("smollm2-135m")), 64, tmp_path / "data", PrepareOptions(limit=12,
            progress=False, workers=1))
    cmd = [sys.executable, "-m", "llara_fast.pretrain", "--model.name", "debug", "--model.random_init", "true",
           "--data.dir", str(tmp_path / "data"),
           "--run.steps", "1", "--run.out_dir", str(tmp_path / "run"), "--data.token_budget", "400"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    ckpt = next((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"from `run/checkpoints/{ckpt.name}`" in card and str(tmp_path) not in card
    dcp_to_torch_save(ckpt, tmp_path / "ck.pt")
    saved = torch.load(tmp_path / "ck.pt", weights_only=False)["model"]
    want = ours_to_hf({k.removeprefix("model."): v for k, v in saved.items()})
    got = read_safetensors(tmp_path / "out")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    enc = Encoder.from_pretrained(str(ckpt), attn_backend="sdpa", device="cpu")
    from_export = Encoder.from_pretrained(str(tmp_path / "out"), attn_backend="sdpa", device="cpu")
    torch.testing.assert_close(enc.encode_queries(QUERIES), from_export.encode_queries(QUERIES), rtol=0, atol=0)


@pytest.fixture(scope="module")
def smollm2_export(smollm2, tmp_path_factory):
    """The fp32 export of the real SmolLM2 weights (with the 16 tokens), written once."""
    model, tok, _ = smollm2
    return export(model, tok, tmp_path_factory.mktemp("smollm2") / "exp", opts=ExportOptions(source="smollm2-135m"))


def test_card_recipe_roundtrip_smollm2(smollm2_export, smollm2):
    """The acceptance check: plain transformers on the export, with the card's recipe, gives
    llara_fast's embeddings, for passages and queries, in padded batches (float64 on both sides:
    EMB_ATOL; the card's own code pools in fp32: pooled_unit_tol on top)."""
    from transformers import AutoModel, AutoTokenizer

    model, tok, _ = smollm2
    out = smollm2_export
    hf = AutoModel.from_pretrained(out, dtype=torch.float64).eval()
    _float64_norms_and_rope(hf)
    hf_tok = AutoTokenizer.from_pretrained(out)
    enc = _float64(model, tok)
    for kind, texts in (("passage", TEXTS), ("query", QUERIES)):
        _assert_emb(enc.encode(texts, kind), card_encode(texts, kind, hf, hf_tok), kind)
    # The card's own code block, executed as written up to its demo (which would load the model again).
    card = (out / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = code[:code.index("tokenizer = AutoTokenizer")]
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    got = ns["encode"](TEXTS, ns["PASSAGE_SUFFIX"], hf, hf_tok)
    assert got.dtype == torch.float32
    # the code block's fp32 pooling of the float64 states, plus our final rounding (half an ulp) and
    # the float64 algebra (ALGEBRA_RTOL): within EMB_ATOL together
    tol = pooled_unit_tol(card_states(TEXTS, "passage", hf, hf_tok)) + EMB_ATOL
    assert_within(got, enc.encode_passages(TEXTS), tol, "the card's code block")


def test_sentence_transformers_smollm2(smollm2_export, smollm2):
    """The export loads in sentence-transformers (trust_remote_code for its module file) and
    encode_query / encode_document / encode give llara_fast's embeddings (float64 on both sides:
    EMB_ATOL)."""
    model, tok, _ = smollm2
    st = _st64(smollm2_export)
    enc = _float64(model, tok)
    for kind, texts, fn in (("query", QUERIES, st.encode_query), ("passage", TEXTS, st.encode_document),
                            ("passage", TEXTS, st.encode)):
        got = torch.as_tensor(fn(texts, batch_size=2, convert_to_tensor=True))
        assert got.shape == (len(texts), model.args.dim)
        _assert_emb(got, enc.encode(texts, kind), kind)
    assert st.similarity_fn_name == "dot" and st.get_embedding_dimension() == model.args.dim
    card = (smollm2_export / "README.md").read_text()
    assert "SentenceTransformer(" in card and "trust_remote_code=True" in card


def test_sentence_transformers_layout(tmp_path):
    """The directory is one sentence-transformers model: its module file needs no llara_fast, its
    configs hold llara_fast's prompt ids, a bf16 export encodes in fp32, re-saving with
    sentence-transformers keeps the embeddings, and the text cap follows max_seq_length."""
    import ast

    from sentence_transformers import SentenceTransformer

    model, tok, _ = load("debug", attn_backend="sdpa")
    out = export(model, tok, tmp_path / "exp")
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["llara_st.LlaraTransformer", "llara_st.LlaraPooling",
                                            "sentence_transformers.base.modules.Normalize"]
    tree = ast.parse((out / "llara_st.py").read_text())
    imported = {n.module.split(".")[0] if isinstance(n, ast.ImportFrom) else a.name.split(".")[0]
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert imported <= {"__future__", "os", "typing", "torch", "transformers", "sentence_transformers"}, imported
    meta = json.loads((out / "llara_fast.json").read_text())
    cfg = json.loads((out / "llara_sentence_transformers.json").read_text())
    assert cfg["prefix_ids"] == meta["prefix_ids"] and cfg["suffix_ids"] == {"query": meta["pred_ids"],
                                                                             "document": meta["sum_ids"]}
    st = _st64(out)
    enc = _float64(model, tok)
    want_q, want_p = enc.encode_queries(QUERIES), enc.encode_passages(TEXTS)
    _assert_emb(st.encode_query(QUERIES, convert_to_tensor=True), want_q, "query")
    st.save(str(tmp_path / "resaved"))
    again = _st64(tmp_path / "resaved")
    _assert_emb(again.encode_document(TEXTS, convert_to_tensor=True), want_p, "resaved")
    st.max_seq_length = 5
    short = _float64(model, tok, max_len=5).encode_passages(TEXTS)
    _assert_emb(st.encode_document(TEXTS, convert_to_tensor=True), short, "max_seq_length 5")
    assert main(["--checkpoint", str(out), "--out", str(tmp_path / "bf16"), "--dtype", "bf16", "--max-len", "5"]) == 0
    half = SentenceTransformer(str(tmp_path / "bf16"), trust_remote_code=True, device="cpu")
    assert half.max_seq_length == 5  # --max-len: the exported text cap, in the module and the card
    card = (tmp_path / "bf16" / "README.md").read_text()
    assert "max_length=5)" in card and "(5 tokens)" in card and "512" not in card
    assert half.encode_query(QUERIES, convert_to_tensor=True).dtype == torch.float32  # bf16 weights, fp32 pooling
    # the bf16 export holds the weights rounded to bf16: in float64 it encodes as our encoder on those
    rounded = copy.deepcopy(model)
    for p in rounded.parameters():
        p.data = p.data.bfloat16().float()
    _assert_emb(_st64(tmp_path / "bf16").encode_query(QUERIES, convert_to_tensor=True),
                _float64(rounded, tok, max_len=5).encode_queries(QUERIES), "bf16 export")


def test_swapped_tokenizer_is_refused(tmp_path):
    """An export whose tokenizer files were replaced by another tokenizer's (with the 16 tokens too):
    encode / evaluate / export load it through load(), which refuses it."""
    from llara_fast.data.sources import sentencepiece_model_path
    from llara_fast.errors import UserError
    from llara_fast.io.hf import add_special_tokens

    model, tok, _ = load("debug", attn_backend="sdpa")
    out = export(model, tok, tmp_path / "exp")
    load(str(out), attn_backend="sdpa")  # intact: loads
    other = load_tokenizer(sentencepiece_model_path())
    add_special_tokens(other)
    for f in out.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    other.save_pretrained(str(out))
    with pytest.raises(UserError, match="tokenizer_fingerprint is not the one llara_fast.json records"):
        load(str(out), attn_backend="sdpa")
    with pytest.raises(UserError, match="do not belong to these weights"):
        Encoder.from_pretrained(str(out), attn_backend="sdpa", device="cpu")


def test_overwrite_never_deletes_runs_or_live_directories(tmp_path, capsys):
    """export --overwrite refuses an --out that is a training run's directory, one that contains
    the checkpoint being exported, and one a live process holds (its lock); a killed export's
    temporary directory is removed by the next export, which names it."""
    from llara_fast.errors import UserError
    from llara_fast.io.export import check_export_target
    from llara_fast.io.lock import DirLock

    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000006").mkdir(parents=True)
    (run / "config.toml").write_text("[run]\n")
    (run / "metrics.jsonl").write_text("{}\n")
    assert main(["--checkpoint", "debug", "--out", str(run), "--overwrite"]) == 2
    assert "is a training run's directory" in capsys.readouterr().err
    assert (run / "checkpoints" / "step_0000006").is_dir() and (run / "metrics.jsonl").is_file()
    with pytest.raises(UserError, match="contains the model being exported"):
        check_export_target(tmp_path, run / "checkpoints" / "step_0000006")
    busy = tmp_path / "busy"
    (busy / "x").mkdir(parents=True)
    holder = DirLock(busy, "run directory")  # a live run (this test stands in for its process)
    import llara_fast.io.lock as lock_mod
    real = lock_mod.os.getpid
    try:
        lock_mod.os.getpid = lambda: real() + 1  # seen from another process
        with pytest.raises(UserError, match=r"busy: in use by pid \d+"):
            check_export_target(busy)
    finally:
        lock_mod.os.getpid = real
        holder.release()
    stale = tmp_path / "m.tmp99999999"  # a pid that does not exist
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert main(["--checkpoint", "debug", "--out", str(tmp_path / "m")]) == 0
    assert not stale.exists() and f"removed {stale}" in capsys.readouterr().err


def test_export_is_readable_by_others(tmp_path):
    """Every exported file gets the permissions of any file this user creates (umask 022: 0644),
    the weights included (safetensors writes them 0600)."""
    old = os.umask(0o022)
    try:
        assert main(["--checkpoint", "debug", "--out", str(tmp_path / "m")]) == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in (tmp_path / "m").rglob("*")}
    assert modes["m/model.safetensors"] == 0o644
    assert all(m == (0o755 if (tmp_path / k).is_dir() else 0o644) for k, m in modes.items()), modes
