"""Text rules of the data path: the released stop-word rule for target texts, and the
sentence-aligned chunking of documents (``prepare --format text / wiki-sample``)."""
from __future__ import annotations

import re

import numpy as np

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


def remove_stopwords(text: str) -> str:
    """The released rule: every run of non-word characters or underscores (Python's Unicode
    ``\\W``: anything but letters, digits and ``_``; combining marks included) becomes one space,
    then words whose lower case is an English stop word are dropped."""
    return " ".join(w for w in _NON_WORD.sub(" ", text).split() if w.lower() not in STOPWORDS)


# Control characters (Unicode Cc: NUL, C0 and C1 codes, DEL) other than tab, newline and carriage return,
# and a byte-order mark anywhere: never text; removed by one rule from every record's text fields.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")


def is_utf8(text: str) -> bool:
    """False for a str UTF-8 cannot hold: lone surrogates, which JSON escapes ("\\ud800") can carry."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def remove_control_chars(text: str) -> tuple[str, int]:
    """(text without control characters and byte-order marks, how many were removed)."""
    return _CONTROL.subn("", text)


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
