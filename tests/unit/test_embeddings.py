"""Embedding shards on disk (llara_fast.io.embeddings): the layout, the commit marker, the
manifest check on resume, duplicates and incomplete directories, the corpus identity."""
from collections import Counter

import numpy as np
import pytest

from llara_fast.errors import UserError
from llara_fast.io.embeddings import COMPLETE, EmbeddingShards, corpus_identity


def _manifest(**kw):
    return {"kind": "passage", "model": {"weights": "w"}, "corpus": {"lines": 5}, "shard_size": 2, "dtype": "float32",
            "dim": 3, **kw}


def test_write_read_and_duplicates(tmp_path):
    store = EmbeddingShards(tmp_path / "e")
    store.start(_manifest())
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 3)).astype(np.float32) for n in (2, 1, 2)]
    ids = [["a", "b"], ["c"], ["a", "d"]]  # "a" again in shard 2: the first is kept
    for i, (d, e) in enumerate(zip(ids, parts)):
        assert not store.done(i)
        store.write(i, d, e, Counter({"corpus_bad_line": 1} if i == 1 else {}))
        assert store.done(i)
    with pytest.raises(UserError, match="not complete"):
        store.read()
    totals = store.finish(3)
    assert totals == {"shards": 3, "documents": 5, "counts": {"corpus_bad_line": 1}}
    got_ids, emb, counts = store.read()
    assert got_ids == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(emb, np.concatenate(parts)[[0, 1, 2, 4]])
    assert counts == {"corpus_bad_line": 1, "corpus_duplicate_id": 1}
    assert emb.dtype == np.float32


def test_missing_shard_and_torn_shard_are_named(tmp_path):
    store = EmbeddingShards(tmp_path / "e")
    store.start(_manifest())
    store.write(0, ["a"], np.ones((1, 3), np.float32), Counter())
    with pytest.raises(UserError, match=r"shards \[1\] are missing"):
        store.finish(2)
    store.write(1, ["b"], np.ones((1, 3), np.float32), Counter())
    store.finish(2)
    np.save(tmp_path / "e" / "shard-00001.npy", np.ones((2, 3), np.float32))  # replaced by something else
    with pytest.raises(UserError, match="shard-00001.npy: holds"):
        store.read()
    with pytest.raises(ValueError, match="2 ids but 1 vectors"):
        store.write(0, ["a", "b"], np.ones((1, 3), np.float32), Counter())


def test_resume_checks_the_manifest(tmp_path):
    root = tmp_path / "e"
    EmbeddingShards(root).start(_manifest())
    EmbeddingShards(root).write(0, ["a"], np.ones((1, 3), np.float32), Counter())
    EmbeddingShards(root).start(_manifest())  # the same run: resumes, keeps the shard
    assert EmbeddingShards(root).done(0)
    with pytest.raises(UserError, match="shard_size: 2 there, 4 now"):
        EmbeddingShards(root).start(_manifest(shard_size=4))
    EmbeddingShards(root).start(_manifest(shard_size=4), overwrite=True)  # replaces it
    assert not EmbeddingShards(root).done(0) and not (root / COMPLETE).exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        EmbeddingShards(tmp_path / "other").start(_manifest())
    with pytest.raises(UserError, match="not this run's"):
        EmbeddingShards(root).check(_manifest())


@pytest.mark.parametrize("text,lines", [("", 0), ("a\n", 1), ("a\nb", 2), ("a\n\nb\n", 3), ("\n", 1)])
def test_corpus_identity_counts_lines(tmp_path, text, lines):
    f = tmp_path / "c.jsonl"
    f.write_bytes(text.encode())
    ident = corpus_identity(f)
    assert ident["lines"] == lines and ident["bytes"] == len(text.encode())
    f.write_bytes((text + "x").encode())
    assert corpus_identity(f)["sha256"] != ident["sha256"]


def test_corpus_identity_sees_an_edit_past_the_first_block(tmp_path, monkeypatch):
    """Same size, same lines, one byte changed in the last block: another corpus."""
    from llara_fast.io import embeddings

    monkeypatch.setattr(embeddings, "BLOCK_BYTES", 8)  # many blocks from a small file
    f = tmp_path / "c.jsonl"
    f.write_bytes(b"first line\nsecond line\nthird\n")
    ident = corpus_identity(f)
    f.write_bytes(b"first line\nsecond line\nthirD\n")
    other = corpus_identity(f)
    assert (other["bytes"], other["lines"]) == (ident["bytes"], ident["lines"]) == (29, 3)
    assert other["sha256"] != ident["sha256"]
