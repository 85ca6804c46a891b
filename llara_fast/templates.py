"""The LLaRA prompts (DESIGN §1) and their tokenised form.

One example is laid out as

    main   = PREFIX  TEXT  SUM      (PREFIX = tokenising '"' with the tokenizer's own specials)
    branch = PRED                   (attends to PREFIX..TEXT and causally to itself)

SUM ends with <s1>..<sK>, PRED with <s9>..<s(8+K)>, K = n_special (8 by default).
"""
from __future__ import annotations

from dataclasses import dataclass

N_NEW_TOKENS = 16
SPECIAL_TOKENS = [f"<s{i}>" for i in range(1, N_NEW_TOKENS + 1)]


@dataclass(frozen=True)
class PromptConfig:
    prefix: str = '"'
    summarize: str = '", summarize the above passage within eight words: '
    predict: str = '", predict the following passage within eight words: '
    n_special: int = 8

    def __post_init__(self):
        if not 1 <= self.n_special <= 8:
            raise ValueError(f"n_special must be in 1..8, got {self.n_special}")

    @property
    def sum_tokens(self) -> list[str]:
        return SPECIAL_TOKENS[: self.n_special]

    @property
    def pred_tokens(self) -> list[str]:
        return SPECIAL_TOKENS[8 : 8 + self.n_special]

    def sum_string(self) -> str:
        return self.summarize + "".join(self.sum_tokens)

    def pred_string(self) -> str:
        return self.predict + "".join(self.pred_tokens)


@dataclass(frozen=True)
class Template:
    """Token ids of the fixed pieces, resolved once per tokenizer."""
    prefix_ids: tuple[int, ...]
    sum_ids: tuple[int, ...]
    pred_ids: tuple[int, ...]
    sum_special_offsets: tuple[int, ...]   # indices into sum_ids of <s1>..<sK>
    pred_special_offsets: tuple[int, ...]  # indices into pred_ids of <s9>..<s(8+K)>
    excluded_target_ids: frozenset[int]    # tokenizer special ids + the 16 new tokens
    n_special: int

    @classmethod
    def from_tokenizer(cls, tokenizer, prompts: PromptConfig = PromptConfig()) -> "Template":
        new_ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
        unk = getattr(tokenizer, "unk_token_id", None)
        if any(i is None or (unk is not None and i == unk) for i in new_ids):
            raise ValueError(
                "tokenizer lacks the LLaRA special tokens <s1>..<s16>; add them with "
                "llara_fast.io.hf.add_special_tokens(tokenizer) first")
        prefix = tokenizer(prompts.prefix, add_special_tokens=True)["input_ids"]
        sum_ids = tokenizer(prompts.sum_string(), add_special_tokens=False)["input_ids"]
        pred_ids = tokenizer(prompts.pred_string(), add_special_tokens=False)["input_ids"]
        sum_want = new_ids[: prompts.n_special]
        pred_want = new_ids[8 : 8 + prompts.n_special]
        sum_off = _find_run(sum_ids, sum_want, "SUM")
        pred_off = _find_run(pred_ids, pred_want, "PRED")
        excluded = frozenset(int(i) for i in tokenizer.all_special_ids) | frozenset(new_ids)
        return cls(tuple(prefix), tuple(sum_ids), tuple(pred_ids), tuple(sum_off), tuple(pred_off),
                   excluded, prompts.n_special)

    @property
    def fixed_tokens(self) -> int:
        """Tokens of the prompt pieces of one example: len(PREFIX) + len(SUM) + len(PRED)."""
        return len(self.prefix_ids) + len(self.sum_ids) + len(self.pred_ids)

    def target_set(self, ids) -> list[int]:
        """Unique target ids in first-seen order, special ids dropped (DESIGN §1 A_i / R_i)."""
        seen: dict[int, None] = {}
        for t in ids:
            t = int(t)
            if t not in self.excluded_target_ids:
                seen.setdefault(t, None)
        return list(seen)


def _find_run(ids: list[int], want: list[int], what: str) -> list[int]:
    out = []
    for tok in want:
        hits = [i for i, t in enumerate(ids) if t == tok]
        if len(hits) != 1:
            raise ValueError(f"{what} prompt: special id {tok} occurs {len(hits)} times in its tokenisation")
        out.append(hits[0])
    if out != list(range(out[0], out[0] + len(out))):
        raise ValueError(f"{what} prompt: special tokens are not contiguous in its tokenisation")
    return out


# The TEXT cap of an example when none is given: pretraining's data.max_len and prepare's --max-len.
DEFAULT_MAX_LEN = 128


@dataclass(frozen=True)
class Lengths:
    """The token budgets of one example, as the released code derives them from ``cutoff_len``
    (its ``data.py`` and ``EmbedCollator``):

    - ``text``: TEXT tokens kept, cutoff_len - len(PREFIX) - len(SUM) - len(PRED);
    - ``target``: target texts are tokenised with the tokenizer's own special tokens and
      truncated at this many tokens before their id set is taken (cutoff_len by default);
    - ``cutoff``: the whole sequence, cutoff_len.
    """
    text: int
    target: int
    cutoff: int

    @classmethod
    def resolve(cls, template: Template, cutoff_len: int | None = None, max_len: int | None = None,
                target_max_len: int | None = None) -> "Lengths":
        """From the released ``cutoff_len``, or from ``max_len`` (the TEXT cap; the cutoff is then
        max_len + the prompt tokens); ``target_max_len`` overrides the target cap."""
        fixed = template.fixed_tokens
        if (cutoff_len is None) == (max_len is None):
            raise ValueError("give exactly one of cutoff_len (the whole sequence, as the released code) and "
                             f"max_len (TEXT tokens); got cutoff_len={cutoff_len}, max_len={max_len}")
        if cutoff_len is not None:
            if cutoff_len - fixed < 1:
                raise ValueError(f"cutoff_len {cutoff_len} leaves no room for the passage: the prompt pieces "
                                 f"take {fixed} tokens under this tokenizer")
            text, cutoff = cutoff_len - fixed, cutoff_len
        else:
            if max_len < 1:
                raise ValueError(f"max_len must be >= 1, got {max_len}")
            text, cutoff = max_len, max_len + fixed
        if target_max_len is not None and target_max_len < 1:
            raise ValueError(f"target_max_len must be >= 1, got {target_max_len}")
        return cls(text, target_max_len or cutoff, cutoff)
