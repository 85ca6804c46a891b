"""Retrieval evaluation: metrics against hand-computed values, BEIR loading of bad input,
exact search, and the CLI end to end on a tiny dataset and a tiny model."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _float64_norms_and_rope
from errmodel import EMB_ATOL, sum_tol

from llara_fast.evaluate import (
    IndexConfig,
    evaluate_run,
    load_beir,
    main,
    mrr_at_k,
    ndcg_at_k,
    rank,
    recall_at_k,
    search,
    search_index,
    to_run,
    write_run_file,
)

SCIFACT = Path(os.environ.get("LLARA_FAST_SCIFACT", "/work/shared/data/beir/scifact"))
L2, L3, L4, L5 = (math.log2(n) for n in (2, 3, 4, 5))


# ---- metrics ----------------------------------------------------------------------------------
def test_graded_relevance_by_hand():
    rels = {"d1": 2, "d2": 1, "d3": 0}
    run = {"d3": 0.9, "d1": 0.8, "d4": 0.7, "d2": 0.6}
    r = rank(run)
    assert r == ["d3", "d1", "d4", "d2"]
    # DCG = 0/log2(2) + 2/log2(3) + 0/log2(4) + 1/log2(5); ideal = 2/log2(2) + 1/log2(3)
    assert ndcg_at_k(r, rels, 10) == pytest.approx((2 / L3 + 1 / L5) / (2 / L2 + 1 / L3))
    assert ndcg_at_k(r, rels, 10) == pytest.approx(1.692536 / 2.630930, abs=1e-6)  # = 0.643322
    assert ndcg_at_k(r, rels, 2) == pytest.approx((2 / L3) / (2 + 1 / L3))  # cut at 2: d2 not reached
    assert mrr_at_k(r, rels, 10) == 0.5
    assert mrr_at_k(r, rels, 1) == 0.0
    assert recall_at_k(r, rels, 100) == 1.0
    assert recall_at_k(r, rels, 2) == 0.5
    # Negative judgements count as not relevant, with gain 0.
    assert ndcg_at_k(["x", "d1"], {"x": -1, "d1": 1}, 10) == pytest.approx(1 / L3)
    assert recall_at_k(["x"], {"x": -1, "d1": 1}, 10) == 0.0


def test_ties_break_by_doc_id():
    rels = {"b": 1}
    for order in (["a", "b", "c"], ["c", "b", "a"], ["b", "c", "a"]):
        run = {d: 0.5 for d in order}
        r = rank(run)
        assert r == ["a", "b", "c"]
        assert mrr_at_k(r, rels, 10) == 0.5
        assert ndcg_at_k(r, rels, 10) == pytest.approx(1 / L3)
    assert rank({"z": 1.0, "a": 0.5, "m": 1.0}) == ["m", "z", "a"]
    assert rank({"10": 1.0, "9": 1.0}) == ["10", "9"]  # string order, documented


def test_evaluate_run_skips_and_counts():
    qrels = {
        "q1": {"d1": 2, "d2": 1, "d3": 0},  # as in test_graded_relevance_by_hand
        "q2": {"d5": 1, "gone": 1},           # one relevant doc never retrieved (e.g. absent from corpus)
        "q3": {"d1": 0},                      # no relevant document: skipped
        "q4": {"d2": 1},                      # not in the run: skipped
    }
    run = {
        "q1": {"d3": 0.9, "d1": 0.8, "d4": 0.7, "d2": 0.6},
        "q2": {**{f"x{i:03d}": 1.0 - i / 1000 for i in range(12)}, "d5": 0.5},  # d5 at rank 13
        "q3": {"d1": 1.0},
        "q9": {"d1": 1.0},                    # no judgements: ignored
    }
    ev = evaluate_run(qrels, run)
    assert set(ev.per_query) == {"q1", "q2"} and ev.n_queries == 2
    assert dict(ev.counts) == {"queries_no_relevant": 1, "queries_missing_from_run": 1,
                               "run_queries_without_qrels": 1}
    q2 = ev.per_query["q2"]
    assert q2 == {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@100": 0.5}
    q1_ndcg = (2 / L3 + 1 / L5) / (2 + 1 / L3)
    assert ev.means["ndcg@10"] == pytest.approx(q1_ndcg / 2)
    assert ev.means["mrr@10"] == pytest.approx(0.25)
    assert ev.means["recall@100"] == pytest.approx(0.75)
    assert math.isnan(evaluate_run({"q": {"d": 0}}, {"q": {"d": 1.0}}).means["ndcg@10"])


def test_search_exact_and_to_run():
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((50, 16)).astype(np.float32)
    qs = rng.standard_normal((7, 16)).astype(np.float32)
    s_np, i_np = search(docs, qs, 20, "numpy")
    s_f, i_f = search(docs, qs, 20, "faiss")
    np.testing.assert_array_equal(i_f, i_np)
    # fp32 inner products of length 16 from two libraries: each within the rounding bound of tests/errmodel.py
    exact = qs.astype(np.float64) @ docs.T.astype(np.float64)  # (7, 50)
    mag = np.abs(qs).astype(np.float64) @ np.abs(docs).T.astype(np.float64)  # (7, 50) sums of |terms|
    tol = sum_tol(16, np.take_along_axis(mag, i_np, 1))
    for got in (s_f, s_np):
        assert (np.abs(got - np.take_along_axis(exact, i_np, 1)) <= tol).all()
    s, i = search(docs[:5], qs, 100, "faiss")  # k capped at the corpus size
    assert i.shape == (7, 5)
    run = to_run([f"q{j}" for j in range(7)], [f"d{j}" for j in range(5)], s, i)
    assert len(run["q0"]) == 5


# ---- BEIR loading -------------------------------------------------------------------------------
def _write_beir(root: Path, crlf=True):
    nl = "\r\n" if crlf else "\n"
    root.mkdir(parents=True, exist_ok=True)
    corpus = [
        {"_id": "d1", "title": "Llamas", "text": "The llama is a domesticated camelid from South America."},
        {"_id": "d2", "title": "", "text": "Paris is the capital and largest city of France."},
        {"_id": "d3", "title": "Alpaca", "text": ""},                        # title only
        {"_id": "d4", "title": "", "text": "   "},                             # no text: left out
        {"_id": 5, "title": "Rome", "text": "Rome is the capital of Italy."},  # integer id
        {"_id": "d1", "title": "dup", "text": "duplicate"},
    ]
    lines = [json.dumps(d) for d in corpus] + ["{not json", json.dumps({"title": "no id"})]
    (root / "corpus.jsonl").write_text(nl.join(lines) + nl)
    queries = [{"_id": "q1", "text": "what is a llama"}, {"_id": "q2", "text": "capital of France"},
               {"_id": "q3", "text": "capital of Italy"}, {"_id": "q4", "text": "   "},
               {"_id": "q5", "text": "only zero judgements"}, {"_id": "q6", "text": "not judged in this split"}]
    (root / "queries.jsonl").write_text(nl.join(json.dumps(q) for q in queries) + nl)
    (root / "qrels").mkdir(exist_ok=True)
    qrels = ["query-id\tcorpus-id\tscore", "q1\td1\t2", "q1\td3\t1", "q2\td2\t1", "q3\t5\t1", "q3\tmissing\t1",
             "q4\td1\t1", "q5\td1\t0", "q7\td2\t1", "bad line", "q2\td1\tx"]
    (root / "qrels" / "test.tsv").write_text(nl.join(qrels) + nl)
    (root / "qrels" / "train.tsv").write_text("q1 0 d1 1\n")  # 4-column TREC qrels, no header
    return root


def test_load_beir_bad_input(tmp_path):
    data = load_beir(_write_beir(tmp_path / "ds"))
    assert data.doc_ids == ["d1", "d2", "d3", "5"]
    assert data.doc_texts[0] == "Llamas The llama is a domesticated camelid from South America."
    assert data.doc_texts[1] == "Paris is the capital and largest city of France."
    assert data.doc_texts[2] == "Alpaca"
    assert data.query_ids == ["q1", "q2", "q3"]
    assert data.qrels["q1"] == {"d1": 2, "d3": 1} and data.qrels["q3"] == {"5": 1, "missing": 1}
    assert dict(data.counts) == {
        "corpus_invalid_json": 1, "corpus_missing_field:_id": 1, "corpus_duplicate_id": 1, "corpus_no_text": 1,
        "corpus_title_only": 1, "queries_empty_text": 1, "queries_not_in_split": 1, "qrels_header": 1,
        "qrels_bad_columns:query-id,corpus-id,score": 1, "qrels_bad_type:score:int": 1,
        "qrels_unknown_query": 2, "qrels_unknown_doc": 1, "queries_no_relevant": 1}
    assert any("duplicate" in p for p in data.problems())
    assert load_beir(tmp_path / "ds", "train").qrels == {"q1": {"d1": 1}}
    with pytest.raises(FileNotFoundError, match=r"no qrels for split 'dev'; available splits: test, train"):
        load_beir(tmp_path / "ds", "dev")
    (tmp_path / "ds" / "queries.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="queries.jsonl: missing"):
        load_beir(tmp_path / "ds")
    with pytest.raises(FileNotFoundError, match="no such BEIR dataset"):
        load_beir(tmp_path / "nothing")


@pytest.mark.skipif(not (SCIFACT / "corpus.jsonl").is_file(), reason=f"SciFact not at {SCIFACT}")
def test_load_scifact():
    data = load_beir(SCIFACT, "test")
    assert len(data.doc_ids) == 5183 and len(data.query_ids) == 300
    assert sum(len(v) for v in data.qrels.values()) == 339
    assert not {k: v for k, v in data.counts.items() if k not in ("qrels_header", "queries_not_in_split")}
    with pytest.raises(FileNotFoundError, match="available splits: test, train"):
        load_beir(SCIFACT, "dev")
    # --max-docs: every relevant document of an evaluated query stays; random others fill up
    sub = data.subset(1000, seed=0)
    relevant = {d for q in data.query_ids for d, r in data.qrels[q].items() if r > 0}
    assert len(sub.doc_ids) == 1000 and relevant <= set(sub.doc_ids)
    assert sub.doc_ids == [d for d in data.doc_ids if d in set(sub.doc_ids)]  # corpus order
    assert dict(zip(sub.doc_ids, sub.doc_texts)) == {d: t for d, t in zip(data.doc_ids, data.doc_texts)
                                                     if d in set(sub.doc_ids)}
    assert data.subset(1000, seed=0).doc_ids == sub.doc_ids != data.subset(1000, seed=1).doc_ids
    assert data.subset(0) is data and data.subset(10**6) is data
    # the cap holds where the relevant documents alone are more (283 for 300 queries: 200 meant 283 before)
    sub = data.subset(200, seed=0)
    assert len(sub.doc_ids) == 200 and 0 < len(sub.query_ids) < 300
    assert sub.counts["queries_over_max_docs"] == 300 - len(sub.query_ids)


def test_max_docs_caps_the_corpus_relevant_documents_included():
    """subset(N): N documents in all; the evaluated queries' relevant documents count toward N and
    always stay; queries whose relevant documents no longer fit are left out (in order), counted."""
    from llara_fast.data.beir import BeirData

    docs = [f"d{i}" for i in range(20)]
    qrels = {"q0": {"d0": 1, "d1": 1}, "q1": {"d2": 1}, "q2": {"d3": 1, "d4": 2, "d5": 1}, "q3": {"d6": 1, "d7": 0}}
    data = BeirData(docs, [f"text {d}" for d in docs], list(qrels), [f"query {q}" for q in qrels], qrels)
    sub = data.subset(5)
    assert sub.query_ids == ["q0", "q1", "q3"] and sub.query_texts == ["query q0", "query q1", "query q3"]
    assert len(sub.doc_ids) == 5 and {"d0", "d1", "d2", "d6"} < set(sub.doc_ids)  # + one drawn at random
    assert sub.counts["queries_over_max_docs"] == 1 and "q2" not in sub.qrels and sub.qrels["q3"] == qrels["q3"]
    sub = data.subset(10)  # all 7 relevant documents fit: every query, 3 drawn at random
    assert len(sub.doc_ids) == 10 and sub.query_ids == data.query_ids and not sub.counts
    assert {"d0", "d1", "d2", "d3", "d4", "d5", "d6"} < set(sub.doc_ids)


# ---- CLI end to end -----------------------------------------------------------------------------
def test_cli_end_to_end(tmp_path, capsys, monkeypatch):
    """The CLI on an export of the debug model. Its --hf-baseline figure compares transformers'
    padded forward with our packed encoder, the same algebra: both run in float64 here (patched in;
    the CLI computes in fp32 on CPU), so the figure is our final rounding to fp32 (EMB_ATOL)."""
    from transformers import AutoModel

    from llara_fast import evaluate
    from llara_fast.io.export import main as export_main

    class AutoModel64:  # transformers in float64, its norms and RoPE too
        @staticmethod
        def from_pretrained(path, **kw):
            model = AutoModel.from_pretrained(path, **{**kw, "dtype": torch.float64})
            _float64_norms_and_rope(model)
            return model

    encoder = evaluate.Encoder.from_pretrained
    monkeypatch.setattr(evaluate, "AutoModel", AutoModel64)
    monkeypatch.setattr(evaluate.Encoder, "from_pretrained",
                        lambda spec, **kw: encoder(spec, dtype=torch.float64, **kw))

    ds = _write_beir(tmp_path / "ds", crlf=False)
    assert export_main(["--checkpoint", "debug", "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    out = tmp_path / "res.json"
    rc = main(["--model", str(tmp_path / "m"), "--beir", str(ds), "--out", str(out), "--quiet",
               "--run-file", str(tmp_path / "run.trec"), "--hf-baseline", "3", "--attn", "sdpa"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert res == json.loads(out.read_text())
    assert res["queries"] == 3 and res["documents"] == 4
    for m in ("ndcg@10", "mrr@10", "recall@100"):
        assert 0.0 <= res[m] <= 1.0
    assert res["counts"]["corpus_no_text"] == 1 and res["counts"]["qrels_unknown_query"] == 2
    assert any(ln.startswith("nDCG@10") for ln in lines) and any("note:" in ln for ln in lines)
    assert res["dtype"] == "float64" and res["hf_baseline"]["max_abs_diff_vs_ours"] <= EMB_ATOL
    assert res["timing"]["passage_tokens_per_s"] > 0
    run = (tmp_path / "run.trec").read_text().splitlines()
    assert len(run) == 3 * 4 and run[0].split()[:4] == ["q1", "Q0", run[0].split()[2], "1"]
    assert main(["--model", "debug", "--beir", str(ds), "--split", "dev"]) == 2
    assert "available splits" in capsys.readouterr().err


def test_qrels_scores_must_be_integers_and_duplicates_are_counted(tmp_path):
    from collections import Counter

    from llara_fast.data.beir import read_qrels

    f = tmp_path / "q.tsv"
    f.write_text("q2\td1\t3\nq1\td1\t0.5\nq1\td2\tinf\nq1\td3\t1.0\nq1\td3\t2\nq1\td4\tnan\nq1\td5\t-1e999\n")
    counts = Counter()
    assert read_qrels(f, counts) == {"q1": {"d3": 1}, "q2": {"d1": 3}}  # 1.0 is the integer 1; the first d3 kept
    assert counts == {"qrels_bad_type:score:int": 4, "qrels_duplicate": 1}


# ---- against trec_eval, approximate search, precomputed embeddings -------------------------------
@pytest.mark.skipif(not (SCIFACT / "corpus.jsonl").is_file(), reason=f"SciFact not at {SCIFACT}")
def test_metrics_equal_pytrec_eval_on_scifact(tmp_path):
    """nDCG@10, MRR@10, Recall@100 and Recall@1000 equal trec_eval's (pytrec_eval-terrier) per
    query to 1e-9, on SciFact's test qrels and a BM25 run of its whole corpus; the run goes
    through our TREC run file, whose tie handling makes trec_eval read our order."""
    import bm25s
    import pytrec_eval

    data = load_beir(SCIFACT, "test")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(data.doc_texts, stopwords="en", show_progress=False), show_progress=False)
    idx, scores = retriever.retrieve(bm25s.tokenize(data.query_texts, stopwords="en", show_progress=False),
                                     k=1000, show_progress=False)
    run = {q: {data.doc_ids[j]: float(s) for j, s in zip(idx[i], scores[i])} for i, q in enumerate(data.query_ids)}
    assert sum(len(set(r.values())) < len(r) for r in run.values()) > 0  # the run has ties: the file must handle them
    ours = evaluate_run(data.qrels, run, ("ndcg@10", "mrr@10", "recall@100", "recall@1000"))
    assert ours.n_queries == 300
    write_run_file(tmp_path / "run.trec", data.query_ids, run)
    with open(tmp_path / "run.trec") as f:
        trec_run = pytrec_eval.parse_run(f)
    qrels = {q: data.qrels[q] for q in data.query_ids}
    full = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100", "recall.1000"}).evaluate(trec_run)
    top10 = {q: {d: s for d, s in sorted(r.items(), key=lambda x: -x[1])[:10]} for q, r in trec_run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    for q, m in ours.per_query.items():
        assert m["ndcg@10"] == pytest.approx(full[q]["ndcg_cut_10"], abs=1e-9), q
        assert m["recall@100"] == pytest.approx(full[q]["recall_100"], abs=1e-9), q
        assert m["recall@1000"] == pytest.approx(full[q]["recall_1000"], abs=1e-9), q
        assert m["mrr@10"] == pytest.approx(rr[q]["recip_rank"], abs=1e-9), q
    assert 0.5 < ours.means["ndcg@10"] < 0.8  # BM25 on SciFact: about 0.67 in the BEIR paper


def test_run_file_keeps_our_tie_order(tmp_path):
    run = {"q": {"b": 0.5, "a": 0.5, "c": 0.7, "d": 0.5}}
    write_run_file(tmp_path / "r.trec", ["q"], run)
    rows = [line.split() for line in (tmp_path / "r.trec").read_text().splitlines()]
    assert [r[2] for r in rows] == ["c", "a", "b", "d"] == rank(run["q"])
    scores = [float(r[4]) for r in rows]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 4  # strictly decreasing
    assert scores[1] == 0.5 and scores[3] > 0.5 - 1e-12


def _clustered(rng, n, d, centres):
    c = rng.standard_normal((centres, d))
    x = c[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_approximate_indexes_report_recall_against_exact():
    rng = np.random.default_rng(0)
    docs, qs = _clustered(rng, 4000, 32, 50), _clustered(rng, 60, 32, 50)
    s_exact, i_exact = search(docs, qs, 100)
    s, i, info = search_index(docs, qs, 100, IndexConfig("flat"))
    np.testing.assert_array_equal(i, i_exact)
    assert "recall@100_vs_exact" not in info
    floors = {"hnsw": 0.9, "ivf": 0.9, "ivfpq": 0.4}
    for kind, floor in floors.items():
        _, i, info = search_index(docs, qs, 100, IndexConfig(kind))
        assert i.shape == (60, 100)
        assert floor <= info["recall@100_vs_exact"] <= 1.0, (kind, info)
    assert info["nlist"] == 4000 // 39 and info["nprobe"] == 32 and info["pq_m"] == 8  # the documented defaults
    _, i, low = search_index(docs, qs, 100, IndexConfig("ivf", nlist=100, nprobe=1))
    _, i, high = search_index(docs, qs, 100, IndexConfig("ivf", nlist=100, nprobe=100))
    assert low["recall@100_vs_exact"] < high["recall@100_vs_exact"] == pytest.approx(1.0, abs=1e-3)


def test_cli_with_precomputed_embeddings(tmp_path, capsys):
    """encode --corpus, then evaluate --embeddings: the same metrics as encoding in evaluate;
    the embeddings of another model and a --k below the metrics' depth are refused."""
    from llara_fast.encode import main as encode_main
    from llara_fast.io.export import main as export_main

    ds = _write_beir(tmp_path / "ds")
    assert export_main(["--checkpoint", "debug", "--out", str(tmp_path / "m")]) == 0
    assert encode_main(["--model", str(tmp_path / "m"), "--corpus", str(ds / "corpus.jsonl"), "--out",
                        str(tmp_path / "emb"), "--shard-size", "3", "--quiet", "--attn", "sdpa"]) == 0
    capsys.readouterr()
    common = ["--model", str(tmp_path / "m"), "--beir", str(ds), "--quiet", "--attn", "sdpa"]
    assert main(common) == 0
    direct = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*common, "--embeddings", str(tmp_path / "emb"), "--metrics", "ndcg@10,mrr@10,recall@100,recall@1000",
                 "--k", "1000"]) == 0
    pre = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert pre["documents"] == direct["documents"] == 4
    for m in ("ndcg@10", "mrr@10", "recall@100"):
        assert pre[m] == pytest.approx(direct[m], abs=1e-6)
    assert pre["metrics"][-1] == "recall@1000" and pre["counts"]["corpus_duplicate_id"] == 1
    assert main([*common, "--metrics", "recall@1000"]) == 2
    assert "needs --k >= 1000" in capsys.readouterr().err
    manifest = tmp_path / "emb" / "embeddings.json"
    m = json.loads(manifest.read_text())
    m["model"]["weights"] = "0" * 32  # as if another model's weights had made them
    manifest.write_text(json.dumps(m))
    assert main([*common, "--embeddings", str(tmp_path / "emb")]) == 2
    assert "made by another model" in capsys.readouterr().err


def test_non_finite_weights_are_refused_in_every_cli(tmp_path, capsys):
    """One NaN in a down_proj of an HF directory: load refuses it naming the tensor, and evaluate,
    encode (texts and corpus) and export each stop with that one line instead of a zero nDCG, NaN
    shards or a plausible-looking run; a model that computes NaN writes no embedding."""
    from safetensors.torch import load_file, save_file

    from llara_fast.encode import Encoder
    from llara_fast.encode import main as encode_main
    from llara_fast.errors import UserError
    from llara_fast.io.export import main as export_main
    from llara_fast.io.load import load

    ds = _write_beir(tmp_path / "ds", crlf=False)
    assert export_main(["--checkpoint", "debug", "--out", str(tmp_path / "m")]) == 0
    st = tmp_path / "m" / "model.safetensors"
    sd = load_file(str(st))
    key = next(k for k in sd if k.endswith("layers.0.mlp.down_proj.weight"))
    sd[key][3, 5] = float("nan")
    save_file(sd, str(st), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"weight layers\.0\.feed_forward\.w2\.weight .* 1 non-finite value"):
        load(str(tmp_path / "m"), attn_backend="sdpa")
    capsys.readouterr()
    runs = [lambda: main(["--model", str(tmp_path / "m"), "--beir", str(ds), "--quiet"]),
            lambda: encode_main(["--model", str(tmp_path / "m"), "--text", "a"]),
            lambda: encode_main(["--model", str(tmp_path / "m"), "--corpus", str(ds / "corpus.jsonl"), "--out",
                                 str(tmp_path / "emb"), "--quiet"]),
            lambda: export_main(["--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "again")])]
    for run in runs:
        assert run() != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "non-finite" in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "emb").exists() or not list((tmp_path / "emb").glob("*.npy"))
    # weights that are finite but overflow: no embedding is returned or written
    model, tok, _ = load("debug", attn_backend="sdpa")
    with torch.no_grad():
        model.norm.weight.fill_(float("inf"))
    with pytest.raises(UserError, match="not finite"):
        Encoder(model, tok, device="cpu").encode_passages(["a text"])


def test_outputs_and_indexes_fail_in_one_line_before_the_work(tmp_path, capsys):
    """An --out that cannot be written is reported before the evaluation runs; --index ivfpq on
    fewer than 256 documents names the minimum (faiss raised a RuntimeError); an output directory
    that cannot be created is one line in every command that locks one."""
    from llara_fast.errors import UserError
    from llara_fast.evaluate import IndexConfig, build_index
    from llara_fast.io.lock import DirLock

    ds = _write_beir(tmp_path / "ds", crlf=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["--model", "debug", "--beir", str(ds), "--quiet", "--out", str(blocker / "res.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot create it" in err[0]
    emb = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    with pytest.raises(UserError, match="ivfpq needs at least 256 documents.*has 40"):
        build_index(emb, IndexConfig(kind="ivfpq"), k=10)
    with pytest.raises(UserError, match="cannot write there"):
        DirLock(blocker / "out", "embedding directory")


def test_all_empty_queries_say_why(tmp_path, capsys):
    """Every query text empty: the one-line error gives the reason they were dropped."""
    from conftest import write_wiki_beir

    ds = write_wiki_beir(tmp_path / "ds", 5, 3)
    (ds / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": "  "}) + "\n" for i in range(3)))
    assert main(["--model", "debug", "--beir", str(ds), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "nothing to evaluate" in err and "queries_empty_text 3" in err, err
