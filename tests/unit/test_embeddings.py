"""Embedding shards on disk (llara_fast.io.embeddings): the layout, the commit marker, the
manifest check on resume, duplicates and incomplete directories, the corpus identity."""
from collections import Counter

import numpy as np
import pytest

from llara_fast.errors import UserError
from llara_fast.io.embeddings import COMPLETE, EmbeddingShards, corpus_identity


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


ONE = _unit(np.ones((1, 3)))


def _manifest(**kw):
    return {"kind": "passage", "model": {"weights": "w"}, "corpus": {"lines": 5}, "shard_size": 2, "dtype": "float32",
            "dim": 3, **kw}


def test_write_read_and_duplicates(tmp_path):
    store = EmbeddingShards(tmp_path / "e")
    store.start(_manifest())
    rng = np.random.default_rng(0)
    parts = [_unit(rng.standard_normal((n, 3))) for n in (2, 1, 2)]
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
    store.write(0, ["a"], ONE, Counter())
    with pytest.raises(UserError, match=r"shards \[1\] are missing"):
        store.finish(2)
    store.write(1, ["b"], ONE, Counter())
    store.finish(2)
    np.save(tmp_path / "e" / "shard-00001.npy", np.concatenate([ONE, ONE]))  # replaced by something else
    with pytest.raises(UserError, match=r"shard 1 is damaged \(shard-00001.npy does not match its checksum"):
        store.read()
    with pytest.raises(ValueError, match="2 ids but 1 vectors"):
        store.write(0, ["a", "b"], np.ones((1, 3), np.float32), Counter())


def test_resume_checks_the_manifest(tmp_path):
    root = tmp_path / "e"
    EmbeddingShards(root).start(_manifest())
    EmbeddingShards(root).write(0, ["a"], ONE, Counter())
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


def test_vectors_must_be_finite_unit_vectors(tmp_path):
    """The format holds unit vectors: a NaN or a vector off the unit sphere (beyond the stored
    dtype's rounding) is refused on reading, naming the file."""
    for bad, match in ((np.array([[np.nan, 0, 1]], np.float32), "NaN/inf"),
                       (np.array([[0, 0, 1.01]], np.float32), "norm 1.01, not 1")):
        store = EmbeddingShards(tmp_path / match[:3])
        store.start(_manifest())
        store.write(0, ["a", "b"], np.concatenate([ONE, bad]), Counter())
        store.finish(1)
        with pytest.raises(UserError, match=rf"shard-00000.npy: vector 1 .*{match}"):
            store.read()
    store = EmbeddingShards(tmp_path / "half")  # float16 storage: its rounding is within the bound
    store.start(_manifest(dtype="float16"))
    store.write(0, ["a"], _unit(np.random.default_rng(0).standard_normal((1, 3))).astype(np.float16), Counter())
    store.finish(1)
    store.read()


@pytest.fixture(scope="module")
def debug_encoder():
    from llara_fast.encode import Encoder
    from llara_fast.io.load import load

    model, tok, _ = load("debug", attn_backend="sdpa")
    return Encoder(model, tok, device="cpu")


def _corpus(path, n=7):
    import json

    path.write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"document number {i} " * (i + 1)})
                            + "\n" for i in range(n)))
    return path


def test_damaged_shards_are_refused_and_a_rerun_repairs_them(tmp_path, debug_encoder, capsys):
    """Truncated vectors, a deleted id file and one flipped exponent bit: reading refuses each with
    one line naming the shard; rerunning the same encode (the documented recovery) says which
    shards it encodes again and gives back exactly the original embeddings."""
    from llara_fast.encode import CorpusJob, encode_corpus, read_embeddings

    corpus = _corpus(tmp_path / "corpus.jsonl")
    job = CorpusJob(str(corpus), str(tmp_path / "emb"), shard_size=3, progress=False)
    encode_corpus(debug_encoder, job)
    ids0, emb0, _ = read_embeddings(job.out, debug_encoder, corpus)
    root = tmp_path / "emb"
    raw = (root / "shard-00000.npy").read_bytes()
    (root / "shard-00000.npy").write_bytes(raw[:-40])  # truncated
    (root / "shard-00001.ids").unlink()  # deleted
    flipped = bytearray((root / "shard-00002.npy").read_bytes())
    flipped[-2] ^= 0x40  # an exponent bit of the last vector's last component
    (root / "shard-00002.npy").write_bytes(bytes(flipped))
    with pytest.raises(UserError, match=r"shard 0 is damaged \(shard-00000.npy does not match its checksum"):
        read_embeddings(job.out, debug_encoder, corpus)
    capsys.readouterr()
    summary = encode_corpus(debug_encoder, job)
    err = capsys.readouterr().err
    assert summary["encoded_shards"] == 3 and all(f"shard {i} is damaged" in err for i in range(3))
    assert "shard-00001.ids is missing" in err
    ids1, emb1, _ = read_embeddings(job.out, debug_encoder, corpus)
    assert ids1 == ids0 and np.array_equal(emb1, emb0)
    assert encode_corpus(debug_encoder, job)["encoded_shards"] == 0  # intact now: nothing to do


def test_embeddings_of_another_corpus_are_refused(tmp_path, debug_encoder):
    """evaluate --embeddings and mining compare the corpus they are given with the one encoded:
    every text replaced (same ids, same line count) is refused, naming what differs."""
    from llara_fast.encode import CorpusJob, encode_corpus, read_embeddings

    corpus = _corpus(tmp_path / "corpus.jsonl")
    encode_corpus(debug_encoder, CorpusJob(str(corpus), str(tmp_path / "emb"), progress=False))
    other = tmp_path / "other.jsonl"
    other.write_text(corpus.read_text().replace("document", "passage"))
    with pytest.raises(UserError, match=r"encoded from another corpus than .*other.jsonl \(bytes, sha256 differ"):
        read_embeddings(str(tmp_path / "emb"), debug_encoder, other)


def test_one_encode_per_output_directory(tmp_path, debug_encoder):
    """A second encode on an --out that a live encode holds fails at once, naming the holder,
    --overwrite included (it would mix two models' shards under one manifest)."""
    from llara_fast.encode import CorpusJob, encode_corpus
    from llara_fast.io.lock import DirLock

    corpus = _corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "emb"
    holder = DirLock(out, "embedding directory")
    try:
        for overwrite in (False, True):
            with pytest.raises(UserError, match=r"emb: in use by pid \d+"):
                encode_corpus(debug_encoder, CorpusJob(str(corpus), str(out), overwrite=overwrite, progress=False))
    finally:
        holder.release()
    encode_corpus(debug_encoder, CorpusJob(str(corpus), str(out), progress=False))  # free again: runs
