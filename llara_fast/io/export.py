"""Drop-in HF export (DESIGN §2 "export (HF dir)").

    python -m llara_fast.export --checkpoint SRC --out DIR [--dtype fp32|bf16] [--max-shard-size 5GB] [--max-len 512]

SRC is a preset (``smollm2-135m``), an HF LLaMA directory, a ``.gguf`` file, or a training
checkpoint RUN/checkpoints/step_N of llara_fast.pretrain. DIR becomes a standard HF directory that
``transformers.AutoModel``, ``AutoModelForCausalLM`` and ``AutoTokenizer`` load with no
custom code: config.json, model.safetensors (sharded with an index when larger than
--max-shard-size), tokenizer files holding <s1>..<s16>, generation_config.json, a README
model card with the encode recipe (DESIGN §1 "Encoder use"), and ``llara_fast.json`` (the
prompt strings, so ``Encoder.from_pretrained(DIR)`` encodes with the prompts the model was
trained with).

Choices: the tokenizer is saved with ``padding_side="left"`` (the released LLaRA encode code
pools the last 8 positions of a padded batch, which is only right under left padding) and,
when it has no pad token, with ``pad_token = eos_token``. The directory is written next to
DIR and moved into place when complete; an existing non-empty DIR is refused unless
``--overwrite``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import GenerationConfig

from llara_fast.config import dtype_arg
from llara_fast.data.shards import tokenizer_fingerprint
from llara_fast.errors import UserError
from llara_fast.io.checkpoint import is_training_checkpoint, materialise, meta_model
from llara_fast.io.hf import hub_commit, resolve_source, save_hf_dir
from llara_fast.io.load import META_FILE, load, pin_revision, run_checkpoint
from llara_fast.io.lock import DirLock, locked_by, remove_stale_tmp
from llara_fast.templates import SPECIAL_TOKENS, PromptConfig, Template

ST_MODULE_FILE = Path(__file__).with_name("st_module.py")


# ---- the export ------------------------------------------------------------------------------
def parse_size(s: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", s, re.IGNORECASE)
    if not m:
        raise UserError(f"cannot read size {s!r} (e.g. 5GB, 500MB, 2GiB, 1000000)")
    unit = (m.group(2) or "").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base ** power)


@dataclass(frozen=True)
class ExportOptions:
    dtype: torch.dtype = torch.float32
    max_shard_bytes: int = 5 * 10**9
    source: str | None = None                     # what the model came from, for the card and llara_fast.json
    source_revision: str | None = None            # the Hub commit of a source that is a Hub model id
    source_dir: str | os.PathLike | None = None   # an HF directory whose generation_config.json is kept
    overwrite: bool = False
    max_len: int = 512                            # the text cap of the encode recipe (ST max_seq_length)


def export(model, tokenizer, out_dir: str | os.PathLike, prompts: PromptConfig = PromptConfig(),
           opts: ExportOptions = ExportOptions()) -> Path:
    """Write ``model`` + ``tokenizer`` as a standard HF directory with a model card."""
    out = Path(out_dir)
    lock = DirLock(out, "export directory", sibling=True)  # a second export to out fails at once
    try:
        return _export(model, tokenizer, out, prompts, opts)
    finally:
        lock.release()


def check_export_target(out: Path, source: str | os.PathLike | None = None) -> None:
    """Refuse an --out that --overwrite would wrongly delete: a directory a live process holds (a
    training run, an encode), a training run's directory, or one that contains the source."""
    holder = locked_by(out)
    if holder is not None:
        raise UserError(f"{out}: in use by {holder}; an export never replaces it")
    if not out.is_dir():
        return
    run_files = [n for n in ("checkpoints", "metrics.jsonl", "config.toml") if (out / n).exists()]
    if "checkpoints" in run_files or len(run_files) >= 2:
        raise UserError(f"{out}: is a training run's directory ({', '.join(run_files)}); export to another --out "
                        "(a run's own export goes to RUN/export)")
    if source is not None and Path(source).exists():
        src = Path(source).resolve()
        if src == out.resolve() or out.resolve() in src.parents:
            raise UserError(f"{out}: contains the model being exported ({source}); export to another --out")


def _export(model, tokenizer, out: Path, prompts: PromptConfig, opts: ExportOptions) -> Path:
    dtype, source, source_dir, overwrite = opts.dtype, opts.source, opts.source_dir, opts.overwrite
    for p in remove_stale_tmp(out, ".tmp"):
        print(f"export: removed {p}, left by an export that was killed", file=sys.stderr)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise UserError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
        check_export_target(out, source)
    template = Template.from_tokenizer(tokenizer, prompts)  # fails early if <s1>..<s16> are missing
    if len(tokenizer) > model.args.vocab_size:
        raise UserError(f"tokenizer has {len(tokenizer)} tokens but the model only {model.args.vocab_size} "
                         "embedding rows")
    tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its settings
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # what save_pretrained writes
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_dir(model, tmp, tokenizer, dtype=dtype, max_shard_bytes=opts.max_shard_bytes)
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = cfg.get("torch_dtype")  # the key transformers >= 5 reads; torch_dtype for older releases
    cfg_path.write_text(json.dumps(cfg, indent=2))
    gen = None
    if source_dir is not None and (Path(source_dir) / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(str(source_dir))  # keep the source's sampling settings
    gen = gen or GenerationConfig()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        val = getattr(tokenizer, name, None)
        if val is not None and getattr(gen, name, None) is None:
            setattr(gen, name, val)
    gen.save_pretrained(str(tmp))
    meta = {"prompts": dataclasses.asdict(prompts), "source": source, "source_revision": opts.source_revision,
            "dtype": str(dtype).replace("torch.", ""),
            "prefix_ids": list(template.prefix_ids), "sum_ids": list(template.sum_ids),
            "pred_ids": list(template.pred_ids), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "special_ids": tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)}
    with open(tmp / META_FILE, "w") as f:
        json.dump(meta, f, indent=2)
    write_sentence_transformers(tmp, template, prompts, opts.max_len)
    (tmp / "README.md").write_text(model_card(tokenizer, template, prompts, source, dtype, opts.max_len,
                                              opts.source_revision))
    readable = 0o666 & ~_umask()  # as any file this user creates (safetensors writes its files 0600)
    for f in tmp.rglob("*"):
        os.chmod(f, readable | (0o111 & ~_umask() if f.is_dir() else 0))
    os.chmod(tmp, 0o777 & ~_umask())
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_sentence_transformers(out: Path, template: Template, prompts: PromptConfig, max_len: int = 512) -> None:
    """Make ``out`` a sentence-transformers directory too: modules.json, its configs and the
    module file ``llara_st.py`` (a copy of llara_fast/io/st_module.py, which needs no llara_fast)."""
    shutil.copyfile(ST_MODULE_FILE, out / "llara_st.py")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "llara_st.LlaraTransformer"},
               {"idx": 1, "name": "1", "path": "1_LlaraPooling", "type": "llara_st.LlaraPooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.base.modules.Normalize"}]
    backbone = {"max_length": max_len, "prefix_ids": list(template.prefix_ids),
                "suffix_ids": {"query": list(template.pred_ids), "document": list(template.sum_ids)},
                "special_positions": {"query": list(template.pred_special_offsets),
                                      "document": list(template.sum_special_offsets)},
                "prompts": {"prefix": prompts.prefix, "query": prompts.pred_string(),
                            "document": prompts.sum_string()}}
    versions = {name: _version(name) for name in ("sentence_transformers", "transformers", "torch")}
    st_config = {"model_type": "SentenceTransformer", "__version__": {k: v for k, v in versions.items() if v},
                 "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "dot"}
    files = {"modules.json": modules, "config_sentence_transformers.json": st_config,
             "llara_sentence_transformers.json": backbone,
             "1_LlaraPooling/config.json": {"n_special": template.n_special},
             "2_Normalize/config.json": {"module_input_name": "sentence_embedding",
                                         "module_output_name": "sentence_embedding"}}
    for name, obj in files.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return None


def public_source(source: str) -> str:
    """The source as a model card shows it: every absolute local path in it cut to what names the
    model without the machine's layout, a checkpoint as RUN/checkpoints/step_N, anything else by
    its basename; presets, Hub ids and relative paths stay as given."""
    def short(word: str) -> str:
        p = Path(word)
        if not p.is_absolute():
            return word
        return str(Path(*p.parts[-3:])) if p.parent.name == "checkpoints" else p.name
    return " ".join(short(w) for w in source.split(" "))


def model_card(tokenizer, template: Template, prompts: PromptConfig, source: str | None,
               dtype: torch.dtype, max_len: int = 512, source_revision: str | None = None) -> str:
    """README.md: what the model is and the encode recipe that reproduces llara_fast's embeddings."""
    K = prompts.n_special
    source = public_source(source) if source else source  # a card is published: no local layout in it
    sum_suffix, pred_suffix = prompts.sum_string(), prompts.pred_string()
    with_specials = tokenizer(sum_suffix)["input_ids"]
    bos_first = len(with_specials) == len(template.sum_ids) + 1 and with_specials[1:] == list(template.sum_ids)
    if bos_first:
        compat = ("This tokenizer prepends a BOS token, so the encode code of the released LLaRA checkpoints "
                  "(BAAI/LLARA-*), which drops it with `tokenizer(suffix)['input_ids'][1:]`, works unchanged.")
    else:
        compat = ("This tokenizer prepends no BOS token, so the released LLaRA encode code's "
                  "`tokenizer(suffix)['input_ids'][1:]` would drop a real token of the prompt: tokenise the "
                  "suffix with `add_special_tokens=False` as below (for a LLaMA-2 tokenizer both forms are "
                  "the same).")
    return f"""---
library_name: transformers
pipeline_tag: feature-extraction
tags:
- llara
- dense-retrieval
- sentence-similarity
- sentence-transformers
---

# LLaRA encoder exported by llara_fast

A LLaMA-architecture model adapted into a dense retriever with LLaRA (EBAE + EBAR,
arXiv 2312.15503), exported by `python -m llara_fast.export`{f" from `{source}`" if source else ""}{
  f" (Hub commit `{source_revision}`)" if source_revision else ""}
(weights stored as {str(dtype).replace("torch.", "")}). It loads with plain `transformers`
(`AutoModel`, `AutoModelForCausalLM`, `AutoTokenizer`), no custom code, and with
`sentence-transformers` (below). The tokenizer holds the
16 LLaRA tokens `<s1>`..`<s16>` (ids {tokenizer.convert_tokens_to_ids("<s1>")}..{tokenizer.convert_tokens_to_ids("<s16>")})
and pads on the left.

## Encoding

- passage: `{prompts.prefix}` + passage + `{sum_suffix}`; embedding = mean of the last hidden
  states (after the final norm) at `{prompts.sum_tokens[0]}`..`{prompts.sum_tokens[-1]}`, L2-normalised.
- query: `{prompts.prefix}` + query + `{pred_suffix}`; mean over `{prompts.pred_tokens[0]}`..`{prompts.pred_tokens[-1]}`, L2-normalised.
- the prefix is tokenised with the tokenizer's own special tokens, the text (truncated to
  {max_len} tokens) and the suffix without. Score = inner product.

{compat}

```python
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

PREFIX = {prompts.prefix!r}
PASSAGE_SUFFIX = {sum_suffix!r}
QUERY_SUFFIX = {pred_suffix!r}
K = {K}  # special tokens that end each suffix


def get_inputs(texts, suffix, tokenizer, max_length={max_len}):
    prefix_ids = tokenizer(PREFIX)["input_ids"]
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    batch = []
    for text in texts:
        ids = tokenizer(text, max_length=max_length, truncation=True, add_special_tokens=False)["input_ids"]
        ids = prefix_ids + ids + suffix_ids
        batch.append({{"input_ids": ids, "attention_mask": [1] * len(ids)}})
    return tokenizer.pad(batch, padding=True, pad_to_multiple_of=8, return_tensors="pt")  # left padding


@torch.no_grad()
def encode(texts, suffix, model, tokenizer):
    inputs = get_inputs(texts, suffix, tokenizer)
    hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]  # (B, L, d), final-normed
    return F.normalize(hidden[:, -K:, :].float().mean(1), dim=-1)  # the K special tokens end the row


tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")
model = AutoModel.from_pretrained("THIS_DIR", dtype=torch.float32).eval()
q = encode(["What is a llama?"], QUERY_SUFFIX, model, tokenizer)
p = encode(["The llama is a domesticated South American camelid."], PASSAGE_SUFFIX, model, tokenizer)
print(q @ p.T)
```

The same embeddings from sentence-transformers (its module file `llara_st.py` builds the
sequences above from the token ids in `llara_sentence_transformers.json`, so it needs
`trust_remote_code=True`; read it first, it is short):

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("THIS_DIR", trust_remote_code=True)
q = model.encode_query(["What is a llama?"])  # the query prompt
p = model.encode_document(["The llama is a domesticated South American camelid."])  # the passage prompt
print(model.similarity(q, p))  # inner product of unit vectors
```

`model.encode(...)` without a task encodes as a passage. A `prompt=` is prepended to the text
inside the template; `model.max_seq_length` is the text cap ({max_len} tokens), the prompt pieces
come on top.

The same embeddings from llara_fast (packed, unpadded):

```python
from llara_fast.encode import Encoder
enc = Encoder.from_pretrained("THIS_DIR")
p = enc.encode_passages(["The llama is a domesticated South American camelid."])
q = enc.encode_queries(["What is a llama?"])
```

`llara_fast.json` records the prompt strings and their token ids.
"""


def gather_trained(module, model, lora: dict):
    """A trained (FSDP) train module's weights as a plain fp32 model (float64 from a float64 run)
    on rank 0's CPU, LoRA merged (``lora``: the run's [lora] section); None on the other ranks.
    Every rank must call it."""
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    state = {k: v.to(torch.promote_types(v.dtype, torch.float32)) for k, v in full.items()}  # fp32 at least
    return materialise(meta_model(dataclasses.replace(model.args), lora), state)


def export_trained(module, model, tokenizer, prompts: PromptConfig, out_dir: Path, lora: dict, source: str,
                   source_revision: str | None = None) -> Path:
    """An HF directory of a trained (FSDP) train module's weights, LoRA merged: gathered from
    every rank, written by rank 0 (``lora``: the run's [lora] section; ``source_revision``: the Hub
    commit of the model the run started from)."""
    plain = gather_trained(module, model, lora)
    if plain is not None:
        export(plain, tokenizer, out_dir, prompts, ExportOptions(source=source, source_revision=source_revision,
                                                                 overwrite=True))
    dist.barrier()
    return Path(out_dir)


# ---- CLI -----------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="preset, HF directory, .gguf file, a training checkpoint RUN/checkpoints/step_N or a run "
                         "directory RUN (its newest complete checkpoint), or a Hub model id ORG/NAME (HF cache; "
                         "downloaded unless HF_HUB_OFFLINE is set)")
    ap.add_argument("--revision", default="main", help="branch, tag or commit of a Hub model id (default main)")
    ap.add_argument("--out", required=True, help="output HF directory")
    ap.add_argument("--dtype", default="float32", type=dtype_arg(("float32", "bfloat16")),
                    help="of the stored weights: float32 (fp32, default) or bfloat16 (bf16)")
    ap.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    ap.add_argument("--max-len", type=int, default=512,
                    help="text cap in tokens of the exported encode recipe: the sentence-transformers module's "
                         "max_seq_length and the card's (the prompt pieces come on top; default 512)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = ap.parse_args(argv)
    if args.max_len < 1:
        ap.error(f"--max-len must be >= 1, got {args.max_len}")
    try:
        source = str(run_checkpoint(args.checkpoint))  # a run directory: its newest complete checkpoint
        revision = pin_revision(source, args.revision)
        model, tok, prompts = load(source, attn_backend="sdpa", revision=revision)
        src_dir = resolve_source(source, revision) if not is_training_checkpoint(source) else None
        out = export(model, tok, args.out, prompts, ExportOptions(
            getattr(torch, args.dtype), parse_size(args.max_shard_size), source, hub_commit(src_dir), src_dir,
            args.overwrite, args.max_len))
    except UserError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    print(f"exported {source} -> {out} ({args.dtype}, {size / 1e6:.1f} MB of weights): {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
