"""benchmarks/replicate.py: the table and plots it makes from its runs' files (the runs themselves
are the project's entry points, tested on their own), and the BM25 row's search."""
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import replicate  # noqa: E402

from llara_fast.data.pairs import _bm25_ranked, bm25_search  # noqa: E402


def _write_runs(out: Path, arms: list[str], seeds: list[int], rng) -> dict:
    """Fake run outputs in the layout replicate.py writes; returns the fine-tuned nDCG@10 drawn."""
    (out / "eval").mkdir(parents=True)
    drawn = {}
    for start in ["base", *arms]:
        row = {"ndcg@10": rng.uniform(), "mrr@10": rng.uniform(), "recall@100": rng.uniform(),
               "documents": 400, "queries": 300, "corpus": "subset: relevant + random (seed 0), 400 of 5183"}
        (out / "eval" / f"{start}.json").write_text(json.dumps(row))
        drawn[start] = []
        for s in seeds:
            v = float(rng.uniform())
            drawn[start].append(v)
            (out / "eval" / f"{start}+ft-s{s}.json").write_text(
                json.dumps(row | {"ndcg@10": v}))
            ft = out / f"ft-{start}-s{s}"
            ft.mkdir()
            # a resumed run repeats step 2: the later record wins
            recs = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 9.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]
            (ft / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for arm in arms:
        d = out / f"adapt-{arm}"
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i + 1, "loss": 5 - i, "lm": 3 - 0.1 * i, "ebae": 8 - 0.2 * i, "ebar": 9 - 0.1 * i}) + "\n"
            for i in range(6)))
    return drawn


def test_report_aggregates_seeds(tmp_path):
    arms, seeds = ["released", "ebae"], [0, 1, 2]
    drawn = _write_runs(tmp_path, arms, seeds, np.random.default_rng(0))
    a = replicate.parse_args(["--out", str(tmp_path), "--arms", ",".join(arms), "--seeds", "0,1,2", "--scale", "cpu"])
    res = replicate.collect(a, seeds)
    for start, xs in drawn.items():
        assert res["finetuned"][start]["ndcg@10"] == xs
        assert res["finetune_loss"][start][0] == [2.0, 1.5, 1.0]
    assert res["adaptation"]["ebae"]["ebae"][-1] == pytest.approx(7.0)
    bm25 = {"ndcg@10": 0.5, "mrr@10": 0.4, "recall@100": 0.9}
    table = replicate.report(a, res, bm25, seeds)
    m, s = statistics.fmean(drawn["ebae"]), statistics.stdev(drawn["ebae"])
    assert f"| adapted (ebae) + FT | {m:.4f} ± {s:.4f} |" in table
    assert "| BM25 | 0.5000 | 0.4000 | 0.9000 |" in table
    assert "300 queries, 400 documents" in table
    assert "| ebae | 3.000 → 2.500 (2.650) | 8.000 → 7.000 (7.300) |" in table
    if replicate.plt is not None:
        replicate.plot(res, bm25, tmp_path / "a.png", tmp_path / "b.png")
        for p in ("a.png", "b.png"):
            assert (tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arguments():
    a = replicate.parse_args(["--scale", "gpu", "--ft-steps", "7"])
    assert a.ft_steps == 7 and a.eval_docs == 0 and a.arms == list(replicate.ARMS)
    with pytest.raises(SystemExit, match="unknown"):
        replicate.main(["--arms", "released,lm_only", "--out", "/nonexistent/never-made"])


def test_bm25_search_orders_by_score():
    docs = ["the cat sat on the mat", "dogs chase cats", "protein folding in cells", "cat food for cats and cat owners"]
    idx, scores = bm25_search(docs, ["cat", "protein cells"], 3)  # (Q, 3) each
    assert idx.shape == scores.shape == (2, 3)
    assert (np.diff(scores, axis=1) <= 0).all()
    assert idx[1, 0] == 2 and idx[0, 0] in (0, 3)
    assert _bm25_ranked(docs, ["cat", "protein cells"], 3) == idx.tolist()
