"""Packed encoder: equality with an independent per-text HF forward, packing/order invariance,
prompts recorded in an export, edge cases, the CLI demo (on the random `debug` preset).

The layout checks run the model in float64 on both sides; the encoder returns fp32
embeddings (unit vectors), so the two sides differ by their final rounding to fp32 alone:
at most one ulp, errmodel.EMB_ATOL."""
import copy

import pytest
import torch
from conftest import hf_reference_model
from errmodel import EMB_ATOL, assert_within, gamma

from llara_fast.encode import Encoder, main
from llara_fast.io.export import export
from llara_fast.io.load import load
from llara_fast.templates import PromptConfig

TEXTS = ["a short one", "The quick brown fox jumps over the lazy dog. " * 6, "", "Paris is in France.",
         "numbers 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15"]


@pytest.fixture(scope="module")
def debug():
    model, tok, _ = load("debug", attn_backend="sdpa", seed=1)
    return model.double().eval(), tok


def _reference(model, tok, texts, kind, prompts=PromptConfig(), max_len=512):
    """One text at a time through transformers' eager LlamaModel, laid out from the prompt strings."""
    ref = hf_reference_model(model)
    suffix = prompts.sum_string() if kind == "passage" else prompts.pred_string()
    specials = prompts.sum_tokens if kind == "passage" else prompts.pred_tokens
    special_ids = set(tok.convert_tokens_to_ids(specials))
    out = []
    for t in texts:
        ids = (tok(prompts.prefix)["input_ids"] + tok(t, add_special_tokens=False)["input_ids"][:max_len]
               + tok(suffix, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            h = ref(input_ids=torch.tensor([ids])).last_hidden_state[0]  # (L, d)
        rows = [i for i, x in enumerate(ids) if x in special_ids]
        assert len(rows) == prompts.n_special
        out.append(torch.nn.functional.normalize(h[rows].mean(0), dim=-1))
    return torch.stack(out).float()


@pytest.mark.parametrize("kind", ["passage", "query"])
def test_matches_per_text_hf_forward(debug, kind):
    model, tok = debug
    enc = Encoder(model, tok, device="cpu", max_len=20)
    got = enc.encode(TEXTS, kind)
    assert got.shape == (len(TEXTS), model.args.dim) and got.dtype == torch.float32
    # fp32 entries within u of a unit vector, their norm taken in fp32: within γ_(d+2) of 1
    assert_within(got.norm(dim=-1), torch.ones(len(TEXTS)), gamma(model.args.dim + 2), "norm")
    torch.testing.assert_close(got, _reference(model, tok, TEXTS, kind, max_len=20), rtol=0, atol=EMB_ATOL)
    assert enc.stats["texts"] == len(TEXTS) and enc.stats["tokens"] > 0


def test_packing_and_order_do_not_matter(debug):
    model, tok = debug
    big = Encoder(model, tok, device="cpu", token_budget=4096).encode_passages(TEXTS)
    small = Encoder(model, tok, device="cpu", token_budget=80)  # many micro-batches, some of one text
    torch.testing.assert_close(small.encode_passages(TEXTS), big, rtol=0, atol=EMB_ATOL)
    perm = [3, 0, 4, 2, 1]
    torch.testing.assert_close(small.encode_passages([TEXTS[i] for i in perm]), big[perm], rtol=0, atol=EMB_ATOL)
    assert not torch.allclose(small.encode_queries(TEXTS), big)  # queries use the PRED prompt
    assert small.encode_passages([]).shape == (0, model.args.dim)
    with pytest.raises(ValueError, match="token budget"):
        Encoder(model, tok, device="cpu", token_budget=10).encode_passages(TEXTS)
    with pytest.raises(ValueError, match="kind"):
        small.encode(TEXTS, "document")


def test_from_pretrained_export_keeps_prompts(tmp_path, debug):
    model, tok = debug
    model = copy.deepcopy(model).float().double()  # weights an fp32 export holds exactly
    prompts = PromptConfig(summarize='", sum it up: ', predict='", what comes next: ', n_special=4)
    out = export(model, tok, tmp_path / "exp", prompts=prompts)
    enc = Encoder.from_pretrained(str(out), attn_backend="sdpa", device="cpu")
    enc.model.double()  # the layout check runs in float64, as the reference
    assert enc.prompts == prompts and enc.template.n_special == 4
    for kind in ("passage", "query"):
        torch.testing.assert_close(enc.encode(TEXTS[:3], kind), _reference(model, tok, TEXTS[:3], kind, prompts),
                                   rtol=0, atol=EMB_ATOL)


def test_cli_demo(capsys):
    main(["--model", "debug", "--text", "a llama", "--text", "an alpaca", "--text", "Paris", "--attn", "sdpa"])
    out = capsys.readouterr().out
    assert "cosine similarity of 3 passage embeddings" in out and "passages/s" in out
    rows = [ln.split() for ln in out.splitlines() if " text" in ln]
    assert [r[:2] for r in rows] == [["0", "text0"], ["1", "text1"], ["2", "text2"]]
    assert all(len(r) == 5 and float(r[2 + int(r[0])]) == pytest.approx(1.0, abs=1e-3) for r in rows)


def test_a_token_budget_below_the_longest_text_is_one_line(capsys):
    """encode --token-budget smaller than a text with its prompt pieces: one error line, exit 2
    (it was a ValueError traceback from the packer)."""
    assert main(["--model", "debug", "--text", "a llama", "--attn", "sdpa", "--max-len", "64",
                 "--token-budget", "5"]) == 2
    err = capsys.readouterr().err
    assert "more than the token budget 5" in err and "Traceback" not in err
