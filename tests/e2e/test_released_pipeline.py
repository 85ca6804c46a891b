"""The whole pipeline the released way, on real text: released-format JSONL -> prepare
--cutoff-len -> one packed loss, against a direct transcription of the released recipe
(FlagEmbedding research/LLARA pretrain: data.py, EmbedCollator, PreLlamaModel.forward) on
SmolLM2-135M: left padding, one dense 4-D mask, fp32 logits at every position, target texts
tokenised by the collator (the tokenizer's own specials, truncation at cutoff_len), then the
special-id rule of DESIGN §1 in place of the reference's LLaMA-only `ids > 2`.

The transcription reads the raw JSONL records and the tokenizer only: nothing of llara_fast's
data path (templates, prepare, packer) is used on its side."""
import copy
import json
import re

import pytest
import torch
from conftest import hf_reference_model
from errmodel import ALGEBRA_RTOL

from llara_fast.data import prepare as P
from llara_fast.data.packing import pack_reference
from llara_fast.data.shards import ShardedDataset
from llara_fast.data.sources import iter_wiki_sample
from llara_fast.data.text import STOPWORDS
from llara_fast.objectives.llara import LossConfig, llara_loss
from llara_fast.templates import Lengths, Template

CUTOFF = 128
PROMPT = '"'
SUFFIXES = ('", summarize the above passage within eight words: <s1><s2><s3><s4><s5><s6><s7><s8>',
            '", predict the following passage within eight words: <s9><s10><s11><s12><s13><s14><s15><s16>')


def released_records() -> list[dict]:
    """Six records in the released format from real text: passage i, its EBAE target (itself) and
    an EBAR target of the next two passages — longer than the TEXT cap, some longer than the cutoff."""
    texts = [t for _, t in iter_wiki_sample()][40:60]
    return [{"input": texts[i], "output_summarize": texts[i], "output_predict": texts[i + 1] + " " + texts[i + 2]}
            for i in range(0, 18, 3)]


def released_stopwords(text: str, stop_words) -> str:
    text = re.sub(r'[\W_]+', ' ', text)
    return ' '.join(w for w in text.split() if w.lower() not in stop_words)


def released_batch(tok, records, cutoff_len, remove_stop_words):
    """TrainDatasetForEmbedding.__getitem__ + EmbedCollator, transcribed (left padding)."""
    stop_words = set(STOPWORDS) | {'!', ',', '.', '?'}
    prefix_ids = tok(PROMPT, truncation=True, max_length=cutoff_len)['input_ids']
    sum_ids, pred_ids = tok(list(SUFFIXES), truncation=True, max_length=cutoff_len, add_special_tokens=False)['input_ids']
    rows, labels, outs_s, outs_p = [], [], [], []
    for r in records:
        budget = cutoff_len - len(prefix_ids) - len(sum_ids) - len(pred_ids)
        text = tok(r['input'], truncation=True, max_length=budget, add_special_tokens=False)['input_ids']
        ids = prefix_ids + text + sum_ids + pred_ids
        rows.append(ids)
        labels.append([-100] * len(prefix_ids) + text + [-100] * (len(sum_ids) + len(pred_ids)))
        s, p = r['output_summarize'], r['output_predict']
        if remove_stop_words:
            s, p = released_stopwords(s, stop_words), released_stopwords(p, stop_words)
        outs_s.append(s)
        outs_p.append(p)
    L = max(len(x) for x in rows)
    pad = lambda x, v: [v] * (L - len(x)) + x  # noqa: E731  left padding
    input_ids = torch.tensor([pad(x, 0) for x in rows])
    attention_mask = torch.tensor([pad([1] * len(x), 0) for x in rows])
    targets = [tok(o, truncation=True, max_length=cutoff_len)['input_ids'] for o in (outs_s, outs_p)]
    return rows, input_ids, attention_mask, torch.tensor([pad(x, -100) for x in labels]), targets, len(sum_ids), len(pred_ids)


def released_loss(ref_model, head, tok, records, cutoff_len, remove_stop_words):
    """PreLlamaModel.forward, transcribed: (total, lm, ebae, ebar) and the id sets used."""
    rows, input_ids, attention_mask, labels, (tgt_s, tgt_p), S, R = released_batch(tok, records, cutoff_len,
                                                                                 remove_stop_words)
    B, L = input_ids.shape
    position_ids = torch.arange(L).repeat(B, 1)
    position_ids[:, -R:] = position_ids[:, -S - R:-S].clone()
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None] & attention_mask.bool()[:, None, :]  # (B, L, L)
    allowed[:, -R:, -R - S:-R] = False  # PRED never sees SUM
    mask = torch.zeros(B, 1, L, L, dtype=head.dtype).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    hidden = ref_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
    logits = (hidden @ head.t()).to(torch.promote_types(hidden.dtype, torch.float32))  # (B, L, V): every position, fp32 (float64 in float64)
    lm = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    special = set(tok.all_special_ids) | set(tok.convert_tokens_to_ids([f"<s{i}>" for i in range(1, 17)]))
    parts, sets = [], []
    for rows_at, targets in ((slice(L - R - 8, L - R), tgt_s), (slice(L - 8, L), tgt_p)):
        logp = torch.log_softmax(logits[:, rows_at].max(dim=1).values, dim=1)  # (B, V)
        terms, used = [], []
        for b in range(B):
            ids = sorted({t for t in targets[b] if t not in special})
            used.append(ids)
            if ids:
                terms.append(-logp[b, ids].mean())
        parts.append(torch.stack(terms).mean())
        sets.append(used)
    total = lm + (parts[0] / 10 + parts[1] / 10) / 2
    return (total, lm, parts[0], parts[1]), rows, sets


@pytest.mark.parametrize("remove_stopwords", [False, True], ids=["plain", "stopwords"])
def test_prepare_cutoff_len_matches_released_recipe(tmp_path, smollm2, remove_stopwords):
    model32, tok, tpl = smollm2
    model = copy.deepcopy(model32).double()  # algebra: both sides in float64, ALGEBRA_RTOL
    records = released_records()
    path = tmp_path / "released.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    P.prepare(path, "llara-jsonl", "smollm2-135m", None, tmp_path / "data", P.PrepareOptions(cutoff_len=CUTOFF,
              remove_stopwords=remove_stopwords, workers=1, progress=False))
    ds = ShardedDataset(tmp_path / "data", tokenizer=tok)
    exs = [ds.example(i) for i in range(len(ds))]
    lengths = Lengths.resolve(tpl, cutoff_len=CUTOFF)
    assert ds.max_len == lengths.text and ds.cutoff_len == CUTOFF

    head = model.lm_head_weight.detach()
    with torch.no_grad():
        want, rows, (sets_s, sets_p) = released_loss(hf_reference_model(model), head, tok, records, CUTOFF,
                                                     remove_stopwords)
    # the data: the released input ids and target sets, example by example
    cut_at_text_cap = 0
    for e, ex in enumerate(exs):
        assert list(tpl.prefix_ids) + ex.text_ids.tolist() + list(tpl.sum_ids) + list(tpl.pred_ids) == rows[e]
        assert sorted(ex.sum_targets.tolist()) == sets_s[e] and sorted(ex.pred_targets.tolist()) == sets_p[e]
        pred_ids = tok(records[e]["output_predict"], add_special_tokens=False)["input_ids"]
        cut_at_text_cap += len(pred_ids) > lengths.text
    assert cut_at_text_cap >= 4  # the EBAR targets exercise the cutoff, not the TEXT cap

    # the loss: ours over one packed batch, every part within ALGEBRA_RTOL (the loss kernels' fp32 is
    # checked against this reference in tests/kernels and test_llara.py)
    batch = pack_reference(exs, Template.from_tokenizer(tok), ds.max_len)
    with torch.no_grad():
        out = llara_loss(model(batch), batch, model.lm_head_weight, LossConfig(impl="reference"))
    for name, got, ref in zip(("total", "lm", "ebae", "ebar"), (out.total, out.lm, out.ebae, out.ebar), want):
        torch.testing.assert_close(got, ref, rtol=ALGEBRA_RTOL, atol=0, msg=lambda m: f"{name}: {m}")
