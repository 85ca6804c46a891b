"""prepare: the released format round trip, text chunking, bad input, tokenizer identity."""
import io
import json
import os
from contextlib import redirect_stdout

import numpy as np
import pytest

from llara_fast.data import prepare as P
from llara_fast.data.shards import ShardedDataset, tokenizer_fingerprint
from llara_fast.data.sources import sentencepiece_model_path
from llara_fast.data.text import STOPWORDS, remove_stopwords, split_sentences
from llara_fast.templates import Template

SYLLABLES = [c + v + n for n in ("", "n") for c in "bcdfghjklmnprstvwxyz" for v in "aeiou"]  # ~250 tokens, ~170 ids
RELEASED = [  # the released LLaRA format: one object per line, read unchanged
    {"input": "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was named after Gustave Eiffel.",
     "output_summarize": "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was named after Gustave Eiffel.",
     "output_predict": "Locally nicknamed \"La dame de fer\", it was constructed from 1887 to 1889."},
    {"input": "Zürich — naïve café, 東京 and emoji 🚀 in one passage.", "output_summarize": "Zürich café 🚀",
     "output_predict": ""},
    {"input": " ".join(["word"] * 300), "output_summarize": " ".join(SYLLABLES), "output_predict": "short"},
]
MAX_LEN = 40


@pytest.fixture(scope="module")
def smol():
    path = P.resolve_tokenizer("smollm2-135m")
    tok = P._load_tokenizer(path)
    return tok, Template.from_tokenizer(tok)


def write_jsonl(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode() + b"\n")
    return path


def run(tmp_path, inp, fmt="llara-jsonl", name="out", **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return P.prepare(inp, fmt, "smollm2-135m", kw.pop("max_len", MAX_LEN), tmp_path / name, P.PrepareOptions(**kw))


def test_released_format_roundtrip(tmp_path, smol):
    tok, tpl = smol
    s = run(tmp_path, write_jsonl(tmp_path / "data.jsonl", RELEASED))
    assert s["examples"] == 3 and s["skipped"] == {} and s["truncated"] == 1 and s["empty_pred_targets"] == 1
    ds = ShardedDataset(tmp_path / "out", tokenizer=tok)
    for i, row in enumerate(RELEASED):
        e = ds.example(i)
        ids = tok(row["input"], add_special_tokens=False)["input_ids"]
        assert e.text_ids.tolist() == ids[:MAX_LEN]
        for field, got in (("output_summarize", e.sum_targets), ("output_predict", e.pred_targets)):
            # --max-len: targets are cut at the equivalent cutoff, max_len + the prompt tokens
            want = tpl.target_set(tok(row[field], truncation=True, max_length=MAX_LEN + tpl.fixed_tokens)["input_ids"])
            assert got.tolist() == want, (i, field)
    long_ids = tok(RELEASED[2]["output_summarize"], add_special_tokens=False)["input_ids"]
    assert len(ds.example(2).sum_targets) > len(tpl.target_set(long_ids[:MAX_LEN]))  # not cut at the TEXT cap
    m = ds.manifest
    assert m["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok) and m["max_len"] == MAX_LEN
    assert m["cutoff_len"] == m["target_max_len"] == MAX_LEN + tpl.fixed_tokens
    assert m["template"]["sum_ids"] == list(tpl.sum_ids) and m["prompts"]["n_special"] == 8
    assert m["token_dtype"] == "uint16" and m["counts"]["examples"] == 3


def test_limit(tmp_path):
    """limit N reads the first N records; 0 reads all of them, as pretrain's data.limit 0 does."""
    inp = write_jsonl(tmp_path / "data.jsonl", RELEASED)
    assert run(tmp_path, inp, name="two", limit=2)["examples"] == 2
    assert run(tmp_path, inp, name="all", limit=0)["examples"] == len(RELEASED)


def test_bad_records_counted_by_reason(tmp_path):
    good = RELEASED[0]
    rows = [good, b"{not json\n", b'{"input": "caf\xe9", "output_summarize": "a", "output_predict": "b"}\n',
            {"input": "x", "output_summarize": "y"}, {"input": 3, "output_summarize": "y", "output_predict": "z"},
            b"[1, 2]\n", {"input": "   ", "output_summarize": "y", "output_predict": "z"},
            b'{"input": "\\ud800", "output_summarize": "a", "output_predict": "b"}\n', b"\n", good]
    s = run(tmp_path, write_jsonl(tmp_path / "bad.jsonl", rows), max_bad_fraction=1.0)
    assert s["examples"] == 2 and s["records"] == 9 and s["blank_lines"] == 1
    assert s["skipped"] == {"invalid_json": 1, "invalid_utf8": 2, "missing_field:output_predict": 1,
                            "bad_type:input:str": 1, "bad_type:record:object": 1, "empty_text": 1}


def test_bad_fraction_stops_naming_file_and_line(tmp_path):
    rows = [RELEASED[0]] * 30 + [b"{oops\n"] + [RELEASED[0]] * 10
    path = write_jsonl(tmp_path / "some.jsonl", rows)
    with pytest.raises(P.PrepareError, match=r"some\.jsonl:31: invalid_json; 1 of 41 records"):
        run(tmp_path, path, max_bad_fraction=0.01)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    assert run(tmp_path, path, max_bad_fraction=0.05)["skipped"] == {"invalid_json": 1}


def test_text_format_chunks(tmp_path, smol):
    tok, tpl = smol
    doc1 = ("Alpha is the first letter. Beta comes second in line! Gamma is third? Delta follows gamma. "
            "Epsilon is fifth and last here.")
    doc2 = "A single short sentence."
    (tmp_path / "in").mkdir()
    broken = doc1.replace("letter. Beta", "letter.\nBeta")  # a .txt document spans several lines
    (tmp_path / "in" / "a.txt").write_text(f"{broken}\n\n\n{doc2}\n")
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"text": doc1}, {"text": ""}, {"no": 1}])
    s = run(tmp_path, tmp_path / "in", fmt="text", chunk_tokens=12, max_bad_fraction=1.0)
    assert s["documents"] == 3 and s["skipped"] == {"empty_text": 1, "missing_field:text": 1}
    ds = ShardedDataset(tmp_path / "out")
    exs = [ds.example(i) for i in range(len(ds))]
    k = [tok.decode(e.text_ids) for e in exs].index(doc2)  # files in sorted order: a.txt, then b.jsonl
    assert k >= 3 and len(exs) > k + 3 and s["no_next_chunk"] == 3 and exs[k].pred_targets.tolist() == []
    for chunk in (exs[:k], exs[k + 1:]):
        for e in chunk:
            assert len(e.text_ids) <= 12
            assert tok.decode(e.text_ids).rstrip()[-1] in ".!?"  # sentence-aligned
        for a, b in zip(chunk, chunk[1:]):            # EBAR target = the next chunk
            assert b.sum_targets.tolist() == a.pred_targets.tolist() != []
        assert chunk[-1].pred_targets.tolist() == []  # the last chunk has no next one
        assert chunk[0].sum_targets.tolist() == tpl.target_set(chunk[0].text_ids)
    # the chunks of the jsonl document are exactly its tokenisation, cut
    assert np.concatenate([e.text_ids for e in exs[k + 1:]]).tolist() == tok(doc1, add_special_tokens=False)["input_ids"]


def test_cutoff_len_as_released(tmp_path, smol):
    """--cutoff-len N: TEXT gets N minus the prompt tokens (released data.py), targets are cut at N
    (its EmbedCollator); --target-max-len overrides the target cap; bad combinations are refused."""
    tok, tpl = smol
    path = write_jsonl(tmp_path / "data.jsonl", RELEASED)
    N = 80
    s = run(tmp_path, path, max_len=None, cutoff_len=N)
    ds = ShardedDataset(tmp_path / "out")
    assert (ds.max_len, ds.cutoff_len, ds.target_max_len) == (N - tpl.fixed_tokens, N, N)
    assert s["text_cap"] == N - tpl.fixed_tokens and s["target_cap"] == N
    e = ds.example(2)
    assert e.text_ids.tolist() == tok(RELEASED[2]["input"], add_special_tokens=False)["input_ids"][:N - tpl.fixed_tokens]
    assert e.sum_targets.tolist() == tpl.target_set(tok(RELEASED[2]["output_summarize"])["input_ids"][:N])
    assert len(e.sum_targets) > len(tpl.target_set(tok(RELEASED[2]["output_summarize"])["input_ids"][:ds.max_len]))
    run(tmp_path, path, name="t20", max_len=None, cutoff_len=N, target_max_len=20)
    assert len(ShardedDataset(tmp_path / "t20").example(2).sum_targets) == 20
    with pytest.raises(P.PrepareError, match="exactly one of cutoff_len"):
        run(tmp_path, path, name="both", cutoff_len=N)
    with pytest.raises(P.PrepareError, match="leaves no room for the passage"):
        run(tmp_path, path, name="small", max_len=None, cutoff_len=tpl.fixed_tokens)
    with redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
        P.main(["--input", str(path), "--format", "llara-jsonl", "--cutoff-len", "80", "--max-len", "40", "--out",
                str(tmp_path / "cli")])  # both


def test_cli_defaults_are_pretrainings(tmp_path, smol):
    """`prepare --format llara-jsonl --input FILE --out DIR` (the README's command): the tokenizer of
    pretraining's default model, the TEXT cap of its data.max_len; pretrain reads the result."""
    from llara_fast.config import DEFAULT_MODEL
    from llara_fast.data.loader import PretrainDataConfig
    from llara_fast.train.config import ModelConfig

    tok, tpl = smol
    assert ModelConfig().name == DEFAULT_MODEL and PretrainDataConfig().max_len == P.DEFAULT_MAX_LEN
    path = write_jsonl(tmp_path / "data.jsonl", RELEASED)
    with redirect_stdout(io.StringIO()):
        assert P.main(["--format", "llara-jsonl", "--input", str(path), "--out", str(tmp_path / "d"),
                       "--workers", "1", "--no-progress"]) == 0
    ds = ShardedDataset(tmp_path / "d", tokenizer=tok)  # refuses another tokenizer
    default = PretrainDataConfig().max_len
    assert (ds.max_len, ds.cutoff_len) == (default, default + tpl.fixed_tokens)


def test_remove_stopwords_released_rule():
    r"""re.sub(r'[\W_]+', ' ', t) (Unicode \W: symbols, emoji, combining marks and underscores go;
    letters and digits of any script stay), then NLTK English stop words (lower-cased) dropped."""
    assert remove_stopwords("The cat, and THE dog; were not here!") == "cat dog"
    assert remove_stopwords("snake_case_name and 3.14 π≈3") == "snake case name 3 14 π 3"
    assert remove_stopwords("cafe\u0301 naïve") == "cafe naïve"  # a combining acute is not a word character
    assert remove_stopwords("Zürich—東京 🚀 it's") == "Zürich 東京"  # "it" and "s" are stop words
    assert remove_stopwords("don't ×2 ½ x² ٣") == "2 ½ x² ٣"  # digits of any kind are word characters
    assert remove_stopwords("The__END__ of_the LINE") == "END LINE"
    assert len(STOPWORDS) == 179


def test_remove_stopwords(tmp_path, smol):
    tok, _ = smol
    row = {"input": "The cat and the dog.", "output_summarize": "The cat and the dog.", "output_predict": "Of it, the!"}
    s = run(tmp_path, write_jsonl(tmp_path / "d.jsonl", [row]), remove_stopwords=True)
    e = ShardedDataset(tmp_path / "out").example(0)
    assert e.sum_targets.tolist() == tok("cat dog")["input_ids"]
    assert e.pred_targets.tolist() == [] and s["empty_pred_targets"] == 1
    assert e.text_ids.tolist() == tok("The cat and the dog.", add_special_tokens=False)["input_ids"]


def test_pretrain_on_the_fly_remove_stopwords(tmp_path, smol):
    """pretrain --data.remove_stopwords true reaches prepare's rule on the on-the-fly path, and the
    cache key holds it: the same input with the rule off prepares again, into another directory."""
    from llara_fast.data.loader import llara_loader
    from llara_fast.pretrain import PretrainConfig
    from llara_fast.train.config import load_config

    tok, tpl = smol
    row = {"input": "The cat and the dog.", "output_summarize": "The cat and the dog.", "output_predict": "Of it, the!"}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    dirs = {}
    for flag in ("true", "false"):
        cfg = load_config(["--data.format", "llara-jsonl", "--data.input", str(path), "--data.remove_stopwords", flag,
                           "--data.limit", "0", "--data.token_budget", "512", "--run.out_dir",
                           str(tmp_path / "runs" / flag)], PretrainConfig)
        with redirect_stdout(io.StringIO()):
            loader = llara_loader(cfg, tok, tpl, 0, 1)
        loader.close()
        ds = loader.dataset
        dirs[flag] = ds.data_dir
        want = "cat dog" if flag == "true" else "The cat and the dog."
        assert ds.example(0).sum_targets.tolist() == tpl.target_set(tok(want)["input_ids"]), flag
    assert dirs["true"] != dirs["false"] and dirs["true"].parent == dirs["false"].parent == tmp_path / "runs" / "data"


def test_split_sentences():
    text = 'He said "Hi." Then left. e.g. this stays. U.S. troops! Next?  Yes\n\nNew para'
    parts = [text[a:b] for a, b in split_sentences(text)]
    assert parts == ['He said "Hi."', "Then left. e.g. this stays.", "U.S. troops!", "Next?", "Yes", "New para"]


def test_cli_wiki_sample_parallel(tmp_path):
    """The default corpus through the CLI, 2 worker processes; same shards as 1 worker."""
    out = io.StringIO()
    argv = ["--format", "wiki-sample", "--tokenizer", "smollm2-135m", "--max-len", "64", "--limit", "300",
            "--no-progress"]
    with redirect_stdout(out):
        assert P.main(argv + ["--out", str(tmp_path / "w2"), "--workers", "2"]) == 0
    s = json.loads(out.getvalue().strip().splitlines()[-1])
    assert s["records"] == 300 and s["documents"] == 300 and s["skipped"] == {}
    assert s["examples"] >= 2 * 300 * 0.8               # chunk-tokens 48: most lead paragraphs give >= 2
    one = run(tmp_path, None, fmt="wiki-sample", name="w1", max_len=64, limit=300)
    assert one["examples"] == s["examples"]
    for f in ("shard-00000.text.bin", "shard-00000.sum.bin", "shard-00000.pred.bin", "shard-00000.offsets.npy"):
        assert (tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes()
    with redirect_stdout(io.StringIO()):  # a refused run says why, exit code 2
        assert P.main(argv + ["--out", str(tmp_path / "w2")]) == 2


def test_sentencepiece_tokenizer_and_fingerprint_check(tmp_path, smol):
    tok, _ = smol
    path = write_jsonl(tmp_path / "d.jsonl", RELEASED[:1])
    s = P.prepare(path, "llara-jsonl", str(sentencepiece_model_path()), 32, tmp_path / "sp", P.PrepareOptions(workers=1,
                  progress=False))
    ds = ShardedDataset(tmp_path / "sp")
    sp = P._load_tokenizer(P.resolve_tokenizer(str(sentencepiece_model_path())))
    assert s["examples"] == 1 and ds.manifest["tokenizer"]["vocab_size"] == 32016
    assert ds.example(0).text_ids.tolist() == sp(RELEASED[0]["input"], add_special_tokens=False)["input_ids"][:32]
    assert ds.manifest["template"]["prefix_ids"][0] == sp.bos_token_id  # LLaMA layout: BOS from the prefix
    with pytest.raises(ValueError, match="prepare the data again"):
        ds.check_tokenizer(tok)
    with pytest.raises(P.PrepareError, match="not a local path, and as a Hub model id it is not in the HF cache"):
        P.prepare(path, "llara-jsonl", "no-such-model", 32, tmp_path / "x", P.PrepareOptions(workers=1, progress=False))


def test_wiki_sample_path_override(tmp_path, monkeypatch):
    """$LLARA_FAST_WIKI_SAMPLE stands in for the package (machines without it); a wrong path is named."""
    from llara_fast.data.sources import iter_wiki_sample, wiki_sample_path

    copy = tmp_path / "wiki.json"
    copy.write_text(json.dumps({"A": {"extract": "alpha text"}, "B": {"extract": ""}, "C": {"extract": "gamma"}}))
    monkeypatch.setenv("LLARA_FAST_WIKI_SAMPLE", str(copy))
    assert wiki_sample_path() == copy
    assert list(iter_wiki_sample()) == [("A", "alpha text"), ("C", "gamma")]
    monkeypatch.setenv("LLARA_FAST_WIKI_SAMPLE", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="missing.json: no such file"):
        wiki_sample_path()


def test_bom_control_chars_and_unreadable_inputs(tmp_path, smol, monkeypatch):
    """A leading UTF-8 BOM is dropped in every format; NUL and other control characters are removed
    from the text by one rule and counted; a FIFO or an unreadable file is one clear error."""
    import os

    from llara_fast.data import records

    tok, _ = smol
    row = {"input": "Nul\x00 and\x07 bell.", "output_summarize": "a\x1fb", "output_predict": "c"}
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\n")
    s = run(tmp_path, p, name="j")
    assert s["skipped"] == {} and s["control_chars_removed"] == 1
    e = ShardedDataset(tmp_path / "j").example(0)
    assert tok.decode(e.text_ids) == "Nul and bell."
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(b"\xef\xbb\xbfFirst doc\x00 here.\n\nSecond one.\n")
    s = run(tmp_path, tmp_path / "in", fmt="text", name="t")
    ds = ShardedDataset(tmp_path / "t")
    assert [tok.decode(ds.example(i).text_ids) for i in range(len(ds))] == ["First doc here.", "Second one."]
    assert s["control_chars_removed"] == 1
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(P.PrepareError, match="not a regular file or directory"):
        run(tmp_path, fifo, name="f")

    def unreadable(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(records, "open", unreadable, raising=False)
    with pytest.raises(P.PrepareError, match=r"bom\.jsonl: cannot read it \(Permission denied\)"):
        run(tmp_path, p, name="u")


def test_one_prepare_per_output_and_stale_temporaries(tmp_path, capsys):
    """A prepare into an --out that another prepare is writing fails at once naming it (both used
    to succeed, the later deleting the earlier's output); a killed prepare's DIR.tmp-PID is
    removed by the next prepare of that DIR, which names it."""
    from llara_fast.errors import UserError
    from llara_fast.io.lock import DirLock

    out = tmp_path / "data"
    opts = P.PrepareOptions(limit=5, progress=False, workers=1)
    holder = DirLock(out, "prepare output", sibling=True)  # flock: another open file, as another process
    try:
        with pytest.raises(UserError, match=r"data: in use by pid \d+"):
            P.prepare(None, "wiki-sample", "smollm2-135m", 64, out, opts)
    finally:
        holder.release()
    stale = tmp_path / "data.tmp-99999999"
    (stale / "shard-00000").mkdir(parents=True)
    P.prepare(None, "wiki-sample", "smollm2-135m", 64, out, opts)
    assert not stale.exists() and f"removed {stale}" in capsys.readouterr().err
    assert (out / "manifest.json").is_file()


def _corpus(tmp_path):
    """A text-format directory: a .txt file (byte-order mark, documents over several lines) and a
    JSONL file with blank lines and bad records."""
    from llara_fast.data.sources import iter_wiki_sample

    paras = [t for _, t in iter_wiki_sample()][:90]
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_bytes(b"\xef\xbb\xbf" + "\n\n \n".join(p.replace(". ", ".\n", 1) for p in paras[:30]).encode())
    rows = []
    for i, p in enumerate(paras[30:]):
        rows.append({"text": p})
        if i % 7 == 3:
            rows += [b"\n", b"{broken\n", {"text": " "}]
    write_jsonl(d / "b.jsonl", rows)
    return d


def _outputs(out):
    files = {f.name: f.read_bytes() for f in sorted(out.iterdir()) if f.name != "manifest.json"}
    m = json.loads((out / "manifest.json").read_text())
    for k in ("seconds", "records_per_s", "out"):
        m["counts"].pop(k)
    return files, m


def test_output_identical_across_workers_and_blocks(tmp_path):
    """Workers read, parse and tokenise line-aligned blocks; the shards, the manifest, the counts
    and the bad-record messages do not depend on the worker count or the block size, with or
    without a limit (a limit inside a block, one at a block's end)."""
    inp = _corpus(tmp_path)
    kw = dict(fmt="text", chunk_tokens=24, shard_examples=40, batch_records=16, max_bad_fraction=1.0)
    for limit, block in ((None, 400), (45, 1500), (71, 1500), (46, 400)):  # JSONL lines: ~500 bytes
        ref = run(tmp_path, inp, name=f"ref{limit}", limit=limit, **kw)
        got = run(tmp_path, inp, name=f"w2{limit}", limit=limit, workers=2, block_bytes=block, **kw)
        assert ref["shards"] > 1 and ref["skipped"] and (limit is None or ref["records"] == limit)
        assert _outputs(tmp_path / f"ref{limit}") == _outputs(tmp_path / f"w2{limit}")
        assert got["blank_lines"] == ref["blank_lines"] and got["records"] == ref["records"]
    errors = []
    for workers, block in ((1, 1 << 20), (2, 300), (2, 1000)):
        with pytest.raises(P.PrepareError) as e:
            run(tmp_path, inp, name="bad", workers=workers, block_bytes=block, **dict(kw, max_bad_fraction=0.05))
        errors.append(str(e.value))
    assert "b.jsonl:" in errors[0] and errors[1:] == errors[:1] * 2


def test_bad_record_check_replays_fixed_batches():
    """BadRecordCheck fed blocks of any size stops where a check after every batch of B records
    stops, with the same message (a batch's bad records by stage, then by record, first 8 shown)."""
    import random

    from llara_fast.data.records import BadRecordCheck, check_bad_fraction

    rng = random.Random(0)
    for trial in range(200):
        n, B, frac = rng.randint(1, 3000), rng.choice([1, 7, 256]), rng.choice([0.005, 0.02, 0.2])
        bads = {i: (rng.randint(0, 2), f"f:{i}", rng.choice(["invalid_json", "empty_text"]))
                for i in rng.sample(range(n), rng.randint(0, n // rng.choice([10, 60, 400]) + 1))}

        def reference():  # the former loop: one check after every batch holding bad records
            seen = bad = 0
            first = []
            for s in range(0, n, B):
                batch = sorted((bads[i][0], i) for i in range(s, min(s + B, n)) if i in bads)
                shown = [bads[i][1:] for _, i in batch][:8]
                seen, bad = min(s + B, n), bad + len(batch)
                if shown:
                    first.extend(shown[:8 - len(first)])
                    check_bad_fraction(seen, bad, frac, shown[-1], first, final=False)
            if first:
                check_bad_fraction(seen, bad, frac, first[-1], first, final=True)

        def blocks():
            check, start = BadRecordCheck(B, frac), 0
            while start < n:
                size = min(rng.randint(0, 2 * B + 5), n - start)
                check.add(size, [(i - start, *bads[i]) for i in range(start, start + size) if i in bads])
                start += size
            check.finish()

        outcomes = []
        for f in (reference, blocks):
            try:
                f()
                outcomes.append(None)
            except P.PrepareError as e:
                outcomes.append(str(e))
        assert outcomes[0] == outcomes[1], trial


def test_blocks_cover_the_input_line_aligned(tmp_path):
    """File blocks tile the file, each starting at a line start (.txt: after a blank line)."""
    from llara_fast.data.records import plan_blocks

    inp = _corpus(tmp_path)
    for name in ("a.txt", "b.jsonl"):
        data = (inp / name).read_bytes()
        blocks = list(plan_blocks(inp / name, "text", 250, 256, None))
        assert len(blocks) > 5 and blocks[0].start == 0 and blocks[-1].end == len(data)
        for a, b in zip(blocks, blocks[1:]):
            assert a.end == b.start and data[:b.start].endswith(b"\n")
            if name == "a.txt":
                assert not data[:b.start].splitlines()[-1].strip()


def test_in_flight_blocks_bounded(tmp_path):
    """At most 2 x workers blocks are handed out ahead of the result being consumed (memory does
    not grow with the corpus)."""
    job, _ = P._resolve_job(None, "wiki-sample", "smollm2-135m", 32, tmp_path / "o", P.PrepareOptions())
    pulled = []

    def blocks():
        from llara_fast.data.records import plan_blocks
        for b in plan_blocks(None, "wiki-sample", 0, 2, 40):
            pulled.append(b)
            yield b
    got = 0
    for _, res in P._results(job, blocks(), 2, lambda: None):
        got += 1
        assert res.records == 2 and len(pulled) - got <= 2 * 2 - 1
    assert got == len(pulled) == 20


def test_default_workers_are_the_usable_cores(tmp_path, monkeypatch):
    """Default --workers: the CPU affinity, capped by a cgroup v2 quota (rounded up)."""
    monkeypatch.setattr(P.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(P, "CGROUP_CPU_MAX", str(tmp_path / "none"))
    assert P.default_workers() == 8
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(P, "CGROUP_CPU_MAX", str(quota))
    for text, want in (("max 100000\n", 8), ("250000 100000\n", 3), ("50000 100000\n", 1), ("2000000 100000", 8)):
        quota.write_text(text)
        assert P.default_workers() == want, text


def test_a_dead_worker_is_an_error_not_a_hang(tmp_path, monkeypatch):
    """A worker process that dies mid-run (the OOM killer, a signal) stops prepare with one line
    naming the block it was reading; a multiprocessing.Pool waited for the lost block forever."""
    import threading

    inp = _corpus(tmp_path)
    kw = dict(fmt="text", chunk_tokens=24, shard_examples=40, batch_records=16, max_bad_fraction=1.0)
    real = P.BatchWorker.run

    def dying(self, block):  # in the (forked) worker: the second block kills its process
        if block.start > 0:
            os._exit(9)
        return real(self, block)
    monkeypatch.setattr(P.BatchWorker, "run", dying)
    got = {}

    def prepare():
        try:
            run(tmp_path, inp, name="dead", workers=2, block_bytes=400, **kw)
        except Exception as e:  # noqa: BLE001 - the test looks at what it is
            got["error"] = e
    t = threading.Thread(target=prepare, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "prepare waits forever for a dead worker's block"
    e = got.get("error")
    assert isinstance(e, P.PrepareError) and "a prepare worker process died while reading" in str(e), repr(e)
    assert "from byte" in str(e) and "fewer --workers" in str(e)
