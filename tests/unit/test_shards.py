"""Shards on disk: writer/reader round trip, epoch order, rank sharding, resumable stream."""
import json

import numpy as np
import pytest
from conftest import random_examples

from llara_fast.data.native import examples_to_source
from llara_fast.data.shards import (
    MANIFEST,
    ExampleStream,
    ShardedDataset,
    ShardWriter,
    epoch_order,
    token_dtype_for,
    write_manifest,
)


def write_dataset(path, examples, vocab=300, shard_examples=7, batch=5, max_len=64):
    """A prepared-like data directory holding ``examples`` (written in batches, as prepare does)."""
    w = ShardWriter(path, token_dtype_for(vocab), shard_examples)
    for i in range(0, len(examples), batch):
        text, toff, st, soff, pt, poff = examples_to_source(examples[i:i + batch])
        w.add(text, np.diff(toff), st, np.diff(soff), pt, np.diff(poff))
    shards = w.close()
    write_manifest(path, {"format_version": 1, "tokenizer": {"spec": "toy", "fingerprint": "f" * 64},
                          "max_len": max_len, "token_dtype": token_dtype_for(vocab).name, "shards": shards})
    return ShardedDataset(path)


@pytest.mark.parametrize("vocab", [300, 70000])
def test_roundtrip(tmp_path, vocab):
    rng = np.random.default_rng(0)
    exs = random_examples(rng, rng.integers(0, 40, size=23), vocab)
    exs[3].text_ids = exs[3].text_ids[:0]
    exs[4].sum_targets = exs[4].sum_targets[:0]
    ds = write_dataset(tmp_path, exs, vocab)
    assert ds.token_dtype == (np.uint16 if vocab <= 65536 else np.uint32)
    assert len(ds) == 23 and len(ds.sources) == 3  # shards close once >= 7 examples: 10, 10, 3
    for i, e in enumerate(exs):
        got = ds.example(i)
        for f in ("text_ids", "sum_targets", "pred_targets"):
            assert getattr(got, f).dtype == np.int64 and np.array_equal(getattr(got, f), getattr(e, f)), (i, f)
    assert ds.text_lengths.tolist() == [len(e.text_ids) for e in exs]
    shard, local = ds.locate(np.array([0, 9, 10, 22]))
    assert shard.tolist() == [0, 0, 1, 2] and local.tolist() == [0, 9, 0, 2]
    with pytest.raises(IndexError):
        ds.example(23)


def test_refuses_incomplete_or_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        ShardedDataset(tmp_path)
    rng = np.random.default_rng(1)
    write_dataset(tmp_path, random_examples(rng, [5, 6, 7], 300))
    with open(tmp_path / "shard-00000.text.bin", "ab") as f:
        f.write(b"xx")
    with pytest.raises(ValueError, match="bytes"):
        ShardedDataset(tmp_path)
    m = json.loads((tmp_path / MANIFEST).read_text())
    m["format_version"] = 99
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match="format_version"):
        ShardedDataset(tmp_path)


def test_epoch_order():
    a = epoch_order(103, seed=3, epoch=0)
    assert sorted(a.tolist()) == list(range(103))
    assert np.array_equal(a, epoch_order(103, seed=3, epoch=0))          # deterministic
    assert not np.array_equal(a, epoch_order(103, seed=3, epoch=1))      # reshuffled per epoch
    assert not np.array_equal(a, epoch_order(103, seed=4, epoch=0))
    assert epoch_order(10, 0, 0, shuffle=False).tolist() == list(range(10))
    parts = [epoch_order(103, 3, 2, rank=r, world_size=4) for r in range(4)]
    assert all(len(p) == 25 for p in parts)                              # equal shares, remainder dropped
    assert len(set(np.concatenate(parts).tolist())) == 100
    with pytest.raises(ValueError, match="rank"):
        epoch_order(10, 0, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="cannot feed"):
        epoch_order(3, 0, 0, rank=0, world_size=4)


def test_stream_resume_exact(tmp_path):
    rng = np.random.default_rng(2)
    ds = write_dataset(tmp_path, random_examples(rng, rng.integers(1, 30, size=17), 300))
    full = [e.text_ids.tolist() for e in ExampleStream(ds, seed=5, epochs=3)]
    assert len(full) == 51
    for cut in (0, 5, 16, 17, 40):
        s = ExampleStream(ds, seed=5, epochs=3)
        it = iter(s)
        head = [next(it).text_ids.tolist() for _ in range(cut)]
        state = json.loads(json.dumps(s.state_dict()))  # survives a checkpoint
        s2 = ExampleStream(ds, seed=5, epochs=3)
        s2.load_state_dict(state)
        assert head + [e.text_ids.tolist() for e in s2] == full, cut
    with pytest.raises(ValueError, match="seed"):
        ExampleStream(ds, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        ExampleStream(ds, seed=5, rank=0, world_size=2).load_state_dict(state)


def test_stream_ranks_partition_an_epoch(tmp_path):
    rng = np.random.default_rng(3)
    exs = random_examples(rng, rng.integers(1, 30, size=20), 300)
    ds = write_dataset(tmp_path, exs)
    seen = []
    for r in range(3):
        seen += [e.text_ids.tolist() for e in ExampleStream(ds, seed=1, rank=r, world_size=3, epochs=1)]
    assert len(seen) == 18 and all(any(s == e.text_ids.tolist() for e in exs) for s in seen)


@pytest.fixture
def prepared(tmp_path):
    from llara_fast.data.prepare import PrepareOptions, prepare

    out = tmp_path / "data"
    prepare(None, "wiki-sample", "smollm2-135m", 64, out,
            PrepareOptions(limit=40, shard_examples=25, batch_records=8, progress=False, workers=1))
    return out


def test_prepared_data_is_checked_before_training(prepared):
    """Issue 26.10: one flipped bit in text.bin (checksums, on first use and with data.verify), a
    shard entry removed from the manifest (its own counts disagree), a shard file on disk that the
    manifest does not list, a deleted pred.bin and offsets that are not a sequence: each is one
    line naming the file, before any training."""
    import shutil

    from llara_fast.data.loader import VERIFIED, verify_dataset
    from llara_fast.errors import UserError

    ds = ShardedDataset(prepared)
    assert len(ds.manifest["shards"]) >= 2 and len(ds) == ds.manifest["counts"]["examples"]
    verify_dataset(ds)  # first use: verified, and remembered
    assert (prepared / VERIFIED).is_file()
    text = prepared / "shard-00000.text.bin"
    raw = bytearray(text.read_bytes())
    raw[7] ^= 0x01
    text.write_bytes(bytes(raw))
    verify_dataset(ShardedDataset(prepared))  # remembered: not read again...
    with pytest.raises(UserError, match=r"shard-00000.text.bin: does not match the checksum"):
        verify_dataset(ShardedDataset(prepared), force=True)  # ...unless data.verify
    (prepared / VERIFIED).unlink()
    with pytest.raises(UserError, match=r"shard-00000.text.bin: does not match the checksum"):
        verify_dataset(ShardedDataset(prepared))  # a directory's first use
    raw[7] ^= 0x01
    text.write_bytes(bytes(raw))

    mpath = prepared / "manifest.json"
    good = mpath.read_text()
    m = json.loads(good)
    m["shards"] = m["shards"][:-1]
    mpath.write_text(json.dumps(m))
    with pytest.raises(UserError, match=r"shards hold \d+ examples but its counts say \d+"):
        ShardedDataset(prepared)
    m["counts"]["examples"] = sum(sh["examples"] for sh in m["shards"])
    mpath.write_text(json.dumps(m))
    with pytest.raises(UserError, match=r"shard shard-0000\d is on disk but not in manifest.json"):
        ShardedDataset(prepared)
    mpath.write_text(good)

    pred = prepared / "shard-00001.pred.bin"
    shutil.move(pred, pred.with_suffix(".gone"))
    with pytest.raises(UserError, match=r"shard-00001.pred.bin: missing"):
        ShardedDataset(prepared)
    shutil.move(pred.with_suffix(".gone"), pred)

    offsets = prepared / "shard-00000.offsets.npy"
    off = np.load(offsets)
    off[0, 3] = off[0, 5] + 1  # not non-decreasing any more
    np.save(offsets, off)
    with pytest.raises(UserError, match=r"shard-00000.offsets.npy: offsets are not a non-decreasing sequence"):
        ShardedDataset(prepared)


def test_add_closes_shards_only_at_the_given_ends(tmp_path):
    """add(..., ends=...) of many batches in one call cuts the shards where one add per batch does,
    wherever the calls split the batches (an end at 0 examples, or at a call's end, or empty calls)."""
    rng = np.random.default_rng(2)
    exs = random_examples(rng, rng.integers(0, 30, size=41), 300)
    sizes = [5, 0, 3, 9, 1, 7, 2, 6, 8]                        # examples per batch (an empty one too)
    ref = ShardWriter(tmp_path / "ref", np.uint16, shard_examples=8)
    ends, i = [], 0
    for n in sizes:
        text, toff, st, soff, pt, poff = examples_to_source(exs[i:i + n])
        ref.add(text, np.diff(toff), st, np.diff(soff), pt, np.diff(poff))
        i += n
        ends.append(i)
    assert [s["examples"] for s in ref.close()] == [8, 9, 8, 8, 8]
    for half in sorted(set(ends) | {e + 2 for e in ends if e + 2 < i}):  # at batch ends and inside batches
        for tie in ({0, 1, 2} if half in ends else {0}):  # which call gets an end at the split: the first
            one = ShardWriter(tmp_path / "one", np.uint16, shard_examples=8)  # (its last), the empty or the
            for c, (a, b) in enumerate(((0, half), (half, half), (half, i))):  # last call (their first, 0)
                text, toff, st, soff, pt, poff = examples_to_source(exs[a:b])
                mine = [e - a for e in ends if a < e < b or (e == half and c == tie) or (e == b == i)]
                one.add(text, np.diff(toff), st, np.diff(soff), pt, np.diff(poff), ends=mine)
            assert one.close() == ref.shards, (half, tie)
            for f in sorted((tmp_path / "ref").iterdir()):
                assert (tmp_path / "one" / f.name).read_bytes() == f.read_bytes(), f.name
