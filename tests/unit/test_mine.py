"""Dense hard negatives (llara_fast.mine): the negatives come from the model's own ranking inside
the rank window and are never positives; precomputed embeddings give the same pairs; the
fine-tuner trains on them."""
import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main, write_wiki_beir

from llara_fast.data.pairs import read_pairs
from llara_fast.data.sources import iter_wiki_sample
from llara_fast.encode import Encoder
from llara_fast.encode import main as encode_main
from llara_fast.mine import main

N_DOCS, N_QUERIES = 40, 12


@pytest.fixture(scope="module")
def wiki_beir(tmp_path_factory) -> Path:
    """Lead paragraphs as the corpus; query i = title i, relevant: paragraph i and (for even i) i + 1."""
    extra = [(i, i + 1) for i in range(0, N_QUERIES, 2)]
    return write_wiki_beir(tmp_path_factory.mktemp("wiki") / "ds", N_DOCS, N_QUERIES, "train", extra)


@pytest.mark.e2e  # mines twice and runs the data.pairs command
def test_dense_negatives_come_from_the_window(tmp_path, wiki_beir):
    out = tmp_path / "mined.jsonl"
    assert main(["--beir", str(wiki_beir), "--model", "debug", "--attn", "sdpa", "--rank-range", "5:25", "--k", "4",
                 "--quiet", "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == N_QUERIES
    # the ranking, recomputed here: the same encoder, numpy inner products
    enc = Encoder.from_pretrained("debug", attn_backend="sdpa", device="cpu")
    paras = [t for _, t in islice(iter_wiki_sample(), N_DOCS)]
    docs = enc.encode_passages(paras).numpy()
    queries = enc.encode_queries([r["query"] for r in recs]).numpy()
    order = np.argsort(-(queries @ docs.T), axis=1, kind="stable")  # (Q, D)
    for r, ranking in zip(recs, order):
        window = {f"d{j}" for j in ranking[5:25]}
        assert len(r["neg_ids"]) == 4 and set(r["neg_ids"]) <= window, r["query_id"]
        assert not set(r["neg_ids"]) & set(r["pos_ids"])
        assert r["neg"] == [paras[int(d[1:])] for d in r["neg_ids"]]
    assert {len(r["pos_ids"]) for r in recs} == {1, 2}
    assert len(read_pairs(out)) == N_QUERIES  # the fine-tuner's reader takes them
    # the same from precomputed corpus embeddings
    assert encode_main(["--model", "debug", "--attn", "sdpa", "--corpus", str(wiki_beir / "corpus.jsonl"), "--out",
                        str(tmp_path / "emb"), "--shard-size", "25", "--quiet"]) == 0
    assert main(["--beir", str(wiki_beir), "--model", "debug", "--attn", "sdpa", "--rank-range", "5:25", "--k", "4",
                 "--quiet", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "pre.jsonl")]) == 0
    assert (tmp_path / "pre.jsonl").read_text() == out.read_text()
    # the spelling, python -m llara_fast.data.pairs --mining dense, runs the same miner
    run_main("llara_fast.data.pairs", ["--beir", str(wiki_beir), "--mining", "dense", "--model", "debug",
                                       "--rank-range", "5:25", "--k", "4", "--out", str(tmp_path / "p.jsonl")])
    assert (tmp_path / "p.jsonl").read_text() == out.read_text()
    assert main(["--beir", str(wiki_beir), "--model", "debug", "--rank-range", "30:5", "--out", str(out)]) == 2


@pytest.mark.e2e
def test_finetune_on_dense_negatives(tmp_path, wiki_beir):
    out = tmp_path / "mined.jsonl"
    assert main(["--beir", str(wiki_beir), "--model", "debug", "--attn", "sdpa", "--rank-range", "2:40", "--k", "3",
                 "--quiet", "--out", str(out)]) == 0
    run_main("llara_fast.finetune", ["--model.name", "debug", "--model.random_init", "true", "--data.train", str(out),
                                     "--data.negatives", "2", "--data.queries", "4", "--run.steps", "2",
                                     "--run.out_dir", str(tmp_path / "run"), "--run.export", "false"])
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
