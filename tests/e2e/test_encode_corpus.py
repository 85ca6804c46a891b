"""Sharded corpus encoding as users run it: `python -m llara_fast.encode --corpus` in one process
and under torchrun with 2, the same embeddings; kill -9 mid-run and rerun: only the missing
shards are encoded and the result is the uninterrupted one."""
import json
import os
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from conftest import run_entry

from llara_fast.data.sources import iter_wiki_sample
from llara_fast.encode import Encoder
from llara_fast.io.embeddings import EmbeddingShards

ROOT = Path(__file__).resolve().parents[2]
N_DOCS, SHARD = 120, 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    lines = [json.dumps({"_id": f"w{i}", "title": title, "text": text})
             for i, (title, text) in enumerate(islice(iter_wiki_sample(), N_DOCS))]
    lines[7] = "{broken"  # a bad line is counted, its shard still completes
    path.write_text("\n".join(lines) + "\n")
    return path


def _encode(corpus, out, nproc=1, check=True, env=None):
    return run_entry(["-m", "llara_fast.encode"], ["--model", "debug", "--attn", "sdpa", "--corpus", str(corpus),
                                                   "--out", str(out), "--shard-size", str(SHARD), "--quiet"],
                     nproc=nproc, check=check, env=env)


def test_two_ranks_equal_one_and_the_in_memory_encoder(tmp_path, corpus):
    """The same shards encoded by 1 or 2 processes, and by the in-memory encoder shard by shard: one
    thread everywhere, the same packing, so bit for bit (no tolerance to fit to a machine)."""
    import torch

    one_thread = {"OMP_NUM_THREADS": "1"}
    _encode(corpus, tmp_path / "one", env=one_thread)
    p = _encode(corpus, tmp_path / "two", nproc=2, env=one_thread)
    assert "rank 1: 6 of 6 shards encoded" in p.stderr and "complete, 119 passages in 12 shards" in p.stdout
    ids1, e1, c1 = EmbeddingShards(tmp_path / "one").read()
    ids2, e2, c2 = EmbeddingShards(tmp_path / "two").read()
    assert ids1 == ids2 and len(ids1) == N_DOCS - 1 and "w7" not in ids1
    assert c1 == c2 == {"corpus_invalid_json": 1}
    np.testing.assert_array_equal(e1, e2)
    enc = Encoder.from_pretrained("debug", attn_backend="sdpa", device="cpu")
    texts = [(i, f"{t} {x}".strip()) for i, (t, x) in enumerate(islice(iter_wiki_sample(), N_DOCS)) if i != 7]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mem = np.concatenate([enc.encode_passages([x for i, x in texts if i // SHARD == s]).numpy()
                              for s in range(N_DOCS // SHARD)])
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(e1, mem)


def test_kill_and_rerun_encodes_only_the_missing_shards(tmp_path, corpus):
    _encode(corpus, tmp_path / "full")
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "llara_fast.encode", "--model", "debug", "--attn", "sdpa", "--corpus", str(corpus),
           "--out", str(out), "--shard-size", str(SHARD), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list(out.glob("shard-*.json"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL, mid-run
    proc.wait()
    done = len(list(out.glob("shard-*.json")))
    assert 3 <= done < 12, done
    assert not (out / "COMPLETE").exists()
    p = _encode(corpus, out)
    assert f"{12 - done} of 12 shards encoded ({done} were done)" in p.stderr
    ids_a, a, _ = EmbeddingShards(tmp_path / "full").read()
    ids_b, b, _ = EmbeddingShards(out).read()
    assert ids_a == ids_b
    np.testing.assert_array_equal(a, b)  # the same process settings: bit for bit
    p = _encode(corpus, out)  # complete: nothing to do
    assert "0 of 12 shards encoded (12 were done)" in p.stderr


def test_a_small_corpus_keeps_every_rank_busy(tmp_path, corpus):
    """Without --shard-size, a corpus far below one 10,000-line shard is cut into about 4 shards per
    rank: both ranks of 2 encode, and the result is the one process's on the same shards (one
    thread each, the same packing: bit for bit)."""
    small = tmp_path / "small.jsonl"
    small.write_text("".join(corpus.read_text().splitlines(keepends=True)[:40]))
    env = {"OMP_NUM_THREADS": "1"}
    args = ["--model", "debug", "--attn", "sdpa", "--corpus", str(small), "--quiet"]
    p = run_entry(["-m", "llara_fast.encode"], [*args, "--out", str(tmp_path / "two")], nproc=2, env=env)
    assert "rank 0: 4 of 4 shards encoded" in p.stderr and "rank 1: 4 of 4 shards encoded" in p.stderr, p.stderr
    run_entry(["-m", "llara_fast.encode"], [*args, "--out", str(tmp_path / "one"), "--shard-size", "5"], env=env)
    ids1, e1, _ = EmbeddingShards(tmp_path / "one").read()
    ids2, e2, _ = EmbeddingShards(tmp_path / "two").read()
    assert ids1 == ids2 and len(ids1) == 39 and np.array_equal(e1, e2)
