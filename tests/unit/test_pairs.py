"""llara_fast.data.pairs: the pairs JSONL reader/writer and the BEIR -> pairs converter."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from llara_fast.data.pairs import Pair, beir_to_pairs, main, read_pairs, write_pairs

SCIFACT = Path("/work/shared/data/beir/scifact")


# ---- read_pairs -------------------------------------------------------------------------------
def _write_lines(path: Path, lines: list[bytes | str], end: bytes = b"\n") -> Path:
    path.write_bytes(b"".join((s.encode() if isinstance(s, str) else s) + end for s in lines))
    return path


BAD_AND_GOOD = [
    '{"query": "q1", "pos": ["p1"], "neg": ["n1"]}',            # 1 kept
    "",                                                         # 2 blank
    "   \t",                                                    # 3 blank
    '{"query": "q", "pos": ["p"]',                              # 4 invalid_json
    "[1, 2]",                                                   # 5 bad_type:record:object
    '{"pos": ["p"]}',                                           # 6 missing_field:query
    '{"query": null, "pos": ["p"]}',                            # 7 missing_field:query
    '{"query": " \\n ", "pos": ["p"]}',                         # 8 empty_query
    '{"query": 3, "pos": ["p"]}',                               # 9 bad_type:query:str
    '{"query": "q"}',                                           # 10 missing_field:pos
    '{"query": "q", "pos": []}',                                # 11 no_positive
    '{"query": "q", "pos": [" ", ""]}',                         # 12 no_positive
    '{"query": "q", "pos": "p"}',                               # 13 bad_type:pos:list[str]
    '{"query": "q", "pos": ["p"], "neg": [1]}',                 # 14 bad_type:neg:list[str]
    '{"query": "q2", "pos": ["p2", " "], "extra": 1}',          # 15 kept, 1 dropped, no neg
    '{"query": "q3", "pos": ["p3"], "neg": ["", "n3", "\\t"]}',  # 16 kept, 2 dropped
    b'{"query": "\xff", "pos": ["p"]}',                         # 17 invalid_utf8
    '{"query": "q4", "pos": ["p4"], "neg": null}',              # 18 kept
    '{"query": "q5", "pos": ["p\\ud800"]}',                      # 19 invalid_utf8: a lone surrogate
]


def test_read_pairs_counts_every_reason(tmp_path, capsys):
    path = _write_lines(tmp_path / "mixed.jsonl", BAD_AND_GOOD)
    counts = Counter()
    pairs = read_pairs(path, counts)
    assert pairs == [Pair("q1", ["p1"], ["n1"]), Pair("q2", ["p2"], []), Pair("q3", ["p3"], ["n3"]),
                     Pair("q4", ["p4"], [])]
    # each reason names the field and the type it needs
    assert counts == Counter({"read": 17, "kept": 4, "blank_line": 2, "invalid_json": 1, "bad_type:record:object": 1,
                              "missing_field:query": 2, "empty_query": 1, "bad_type:query:str": 1,
                              "missing_field:pos": 1, "bad_type:pos:list[str]": 1, "bad_type:neg:list[str]": 1,
                              "no_positive": 2, "invalid_utf8": 2, "dropped_empty_text": 3})
    messages = capsys.readouterr().err.splitlines()  # plain lines: no Python warning with a source path
    # the first five bad records one by one (file:line and reason), then one line for the rest
    assert messages[:5] == [f"{path}:4: invalid_json (record skipped)",
                            f"{path}:5: bad_type:record:object (record skipped)",
                            f"{path}:6: missing_field:query (record skipped)",
                            f"{path}:7: missing_field:query (record skipped)",
                            f"{path}:8: empty_query (record skipped)"]
    assert messages[5:] == [f"{path}: 8 more bad records skipped"]


def test_read_pairs_crlf_and_bom(tmp_path):
    lines = ['{"query": "q1", "pos": ["a", "b"], "neg": ["c"]}', "", '{"query": "q2", "pos": ["d"]}']
    path = tmp_path / "crlf.jsonl"
    _write_lines(path, lines, end=b"\r\n")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    counts = Counter()
    assert read_pairs(path, counts) == [Pair("q1", ["a", "b"], ["c"]), Pair("q2", ["d"], [])]
    assert dict(counts) == {"read": 2, "kept": 2, "blank_line": 1}


def test_read_pairs_keeps_texts_unchanged(tmp_path):
    rec = {"query": "  Wie geht's?\n", "pos": [" ü\té "], "neg": ["x "]}
    path = _write_lines(tmp_path / "t.jsonl", [json.dumps(rec, ensure_ascii=False)])
    assert read_pairs(path) == [Pair(**rec)]


def test_read_pairs_max_bad_fraction(tmp_path):
    good = '{"query": "q", "pos": ["p"]}'
    path = _write_lines(tmp_path / "quarter_bad.jsonl", [good, "", good, "{oops", good])  # bad: line 4, 1 of 4
    assert len(read_pairs(path, max_bad_fraction=0.25)) == 3  # 1/4 is not above 0.25
    counts = Counter()
    with pytest.raises(ValueError) as err:
        read_pairs(path, counts, max_bad_fraction=0.2)
    msg = str(err.value)
    assert "quarter_bad.jsonl:4 (invalid_json)" in msg
    assert "invalid_json=1" in msg and "read=4" in msg and "kept=3" in msg
    assert counts["invalid_json"] == 1  # the caller's counter is filled before the error


def test_read_pairs_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_pairs(tmp_path / "nope.jsonl")


def test_read_pairs_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert read_pairs(path, max_bad_fraction=0.0) == []


def test_write_read_round_trip(tmp_path):
    items = [Pair("Grüße", ["p1", "p2"], ["n1"]),
             {"query": "q\n2", "pos": ["\"quoted\""], "neg": [], "query_id": "7"},
             Pair("q3", ["p3"], [])]
    path = tmp_path / "sub" / "out.jsonl"
    assert write_pairs(items, path) == 3
    assert read_pairs(path) == [items[0], Pair("q\n2", ['"quoted"'], []), items[2]]
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


# ---- beir_to_pairs ----------------------------------------------------------------------------
# q1's words (zebra, stripes, flies) appear in d1 (relevant), d9 (the same text as d1), d2 (all three,
# not relevant: the hardest negative) and d6 ("zebra" only: the second); no other document shares one.
CORPUS = {
    "d1": ("Zebra", "Zebra stripes deter biting flies."),
    "d2": ("", "Zebra stripes, zebra stripes and flies."),
    "d3": ("Penguins", "Penguins live in Antarctica."),
    "d4": ("", "Coffee beans are roasted before brewing."),
    "d5": ("Markets", "The stock market fell sharply on Monday."),
    "d6": ("", "A zebra crossing is a road marking."),
    "d7": ("Emperor penguins", "Emperor penguins breed in the Antarctica winter."),
    "d8": ("", "The Antarctica ice sheet holds most fresh water."),
    "d9": ("Zebra", "Zebra stripes deter biting flies."),
    "d10": ("", ""),  # no text: not in the corpus
}
QUERIES = {"q1": "zebra stripes flies", "q2": "penguins antarctica", "q3": "coffee", "q4": "missing doc",
           "q5": "not judged", "q6": "what is it about"}
QRELS = [("q1", "d1", 1), ("q2", "d3", 1), ("q2", "d7", 2), ("q2", "d4", 0), ("q3", "d4", 0),
         ("q4", "d404", 1), ("q6", "d5", 1)]


@pytest.fixture
def beir_dir(tmp_path) -> Path:
    root = tmp_path / "tiny"
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as f:
        for i, (title, text) in CORPUS.items():
            f.write(json.dumps({"_id": i, "title": title, "text": text}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for i, text in QUERIES.items():
            f.write(json.dumps({"_id": i, "text": text}) + "\n")
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                              "".join(f"{q}\t{d}\t{s}\n" for q, d, s in QRELS))
    return root


def _text(doc_id: str) -> str:
    return " ".join(CORPUS[doc_id]).strip()


def test_bm25_negatives_known_by_construction(beir_dir):
    counts = Counter()
    recs = {r["query_id"]: r for r in beir_to_pairs(beir_dir, negatives="bm25", k=2, counts=counts)}
    assert sorted(recs) == ["q1", "q2", "q6"]  # q3: no relevant doc, q4: relevant doc absent, q5: not judged
    q1 = recs["q1"]
    assert q1["query"] == "zebra stripes flies" and q1["pos_ids"] == ["d1"] and q1["pos"] == [_text("d1")]
    assert q1["neg_ids"] == ["d2", "d6"]  # d9 (same text as the positive) is never a negative
    assert q1["neg"] == [_text("d2"), _text("d6")]
    q2 = recs["q2"]
    assert q2["pos_ids"] == ["d3", "d7"] and q2["neg_ids"][0] == "d8"
    assert len(recs["q6"]["neg_ids"]) == 2 and "d5" not in recs["q6"]["neg_ids"]  # only stop words: no crash
    assert counts["no_positive"] == 2 and counts["queries_no_relevant"] == 1 and counts["qrels_unknown_doc"] == 1
    assert counts["records"] == 3 and counts["negatives"] == 6 and counts["neg_same_text_as_pos"] == 1
    assert counts["short_negatives"] == 0


@pytest.mark.parametrize("negatives", ["bm25", "random"])
def test_negatives_exclude_positives(beir_dir, negatives):
    counts = Counter()
    recs = {r["query_id"]: r for r in beir_to_pairs(beir_dir, negatives=negatives, k=100, counts=counts)}
    everything = {d for d, (title, text) in CORPUS.items() if title or text}
    # asking for more than there are gives every document that is not a positive (nor a copy of one)
    assert set(recs["q1"]["neg_ids"]) == everything - {"d1", "d9"}
    assert set(recs["q2"]["neg_ids"]) == everything - {"d3", "d7"}
    assert set(recs["q6"]["neg_ids"]) == everything - {"d5"}
    for r in recs.values():
        assert len(set(r["neg_ids"])) == len(r["neg_ids"])
        assert r["neg"] == [_text(d) for d in r["neg_ids"]]
    assert counts["short_negatives"] == 3


def test_random_negatives_deterministic(beir_dir):
    runs = {seed: [r["neg_ids"] for r in beir_to_pairs(beir_dir, negatives="random", k=3, seed=seed)]
            for seed in range(6)}
    assert [r["neg_ids"] for r in beir_to_pairs(beir_dir, negatives="random", k=3, seed=0)] == runs[0]
    assert len({json.dumps(v) for v in runs.values()}) > 1  # the seed matters
    for negs in runs.values():
        assert all(len(n) == 3 for n in negs)
        assert not {"d1", "d9"} & set(negs[0]) and not {"d3", "d7"} & set(negs[1]) and "d5" not in negs[2]


def test_beir_to_pairs_bad_arguments(beir_dir):
    with pytest.raises(ValueError, match="unknown negatives"):
        beir_to_pairs(beir_dir, negatives="dense")
    with pytest.raises(FileNotFoundError, match="split 'dev'"):
        beir_to_pairs(beir_dir, split="dev")
    assert all(r["neg"] == [] for r in beir_to_pairs(beir_dir, k=0))


def test_cli_writes_readable_pairs(beir_dir, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    assert main(["--beir", str(beir_dir), "--k", "2", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("pairs: 3 records (bm25, k=2)") and "no_positive=2" in line
    counts = Counter()
    pairs = read_pairs(out, counts, max_bad_fraction=0.0)
    assert counts["kept"] == 3 and pairs[0] == Pair("zebra stripes flies", [_text("d1")], [_text("d2"), _text("d6")])


def test_cli_refuses_an_existing_out_unless_overwrite(beir_dir, tmp_path, capsys):
    """As prepare and export refuse a non-empty --out: an existing file is kept (said before any
    work) unless --overwrite."""
    out = tmp_path / "pairs.jsonl"
    out.write_text("mine\n")
    assert main(["--beir", str(beir_dir), "--k", "2", "--out", str(out)]) == 2
    assert f"{out}: exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert out.read_text() == "mine\n"
    assert main(["--beir", str(beir_dir), "--k", "2", "--out", str(out), "--overwrite"]) == 0
    assert len(read_pairs(out)) == 3


def test_one_default_number_of_mined_negatives(capsys):
    """pairs --k, mine --k, beir_to_pairs and finetune's data.mined all read MINED_NEGATIVES."""
    import inspect

    from llara_fast.data.pairs import MINED_NEGATIVES, FinetuneDataConfig
    from llara_fast.mine import main as mine_main

    assert inspect.signature(beir_to_pairs).parameters["k"].default == MINED_NEGATIVES
    assert FinetuneDataConfig().mined == MINED_NEGATIVES
    for cli in (main, mine_main):
        with pytest.raises(SystemExit):
            cli(["--help"])
        assert f"(default {MINED_NEGATIVES})" in " ".join(capsys.readouterr().out.split())


# ---- the real SciFact train split -------------------------------------------------------------
def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.skipif(not (SCIFACT / "qrels" / "train.tsv").is_file(), reason=f"{SCIFACT} is absent")
def test_scifact_train_bm25():
    corpus = {r["_id"] for r in _jsonl(SCIFACT / "corpus.jsonl")}
    queries = {r["_id"] for r in _jsonl(SCIFACT / "queries.jsonl") if r["text"].strip()}
    positives: dict[str, set[str]] = {}
    for line in (SCIFACT / "qrels" / "train.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        if int(s) > 0 and d in corpus and q in queries:
            positives.setdefault(q, set()).add(d)

    recs = beir_to_pairs(SCIFACT, "train", negatives="bm25", k=3)
    assert len(recs) == len(positives)
    for r in recs:
        assert len(r["neg"]) == len(r["neg_ids"]) == 3
        assert set(r["pos_ids"]) == positives[r["query_id"]]
        assert not set(r["neg_ids"]) & positives[r["query_id"]]
