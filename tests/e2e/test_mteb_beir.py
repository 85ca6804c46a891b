"""The MTEB route (benchmarks/mteb_beir.py): an export evaluated by MTEB on a local BEIR-format
dataset with every network connection refused; MTEB gives queries the query prompt and passages
the passage prompt, and its scores equal llara_fast.evaluate's on the same data."""
import json
import socket
import sys
from pathlib import Path

import pytest
from conftest import write_wiki_beir

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
mteb_beir = pytest.importorskip("mteb_beir")
pytest.importorskip("mteb")


def test_mteb_offline_equals_evaluate(tmp_path, monkeypatch, capsys):
    from llara_fast.evaluate import main as evaluate_main
    from llara_fast.io.export import main as export_main

    ds = write_wiki_beir(tmp_path / "ds", 40, 15)
    assert export_main(["--checkpoint", "debug", "--out", str(tmp_path / "m")]) == 0
    assert evaluate_main(["--model", str(tmp_path / "m"), "--beir", str(ds), "--quiet", "--attn", "sdpa"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    def refuse(self, *a, **kw):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    r = mteb_beir.run(str(tmp_path / "m"), str(ds))
    assert r["texts_by_task"] == {"query": 15, "document": 40}
    assert r["documents"] == 40 and r["queries"] == 15
    for m in ("ndcg@10", "mrr@10", "recall@100"):
        assert r[m] == pytest.approx(ours[m], abs=1e-4), m  # ours are rounded to 5 digits
    assert 0 < r["ndcg@10"] < 1 and 0 < r["mrr@10"] < 1  # a ranking with something to get right or wrong
