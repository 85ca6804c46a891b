"""One way in: ``load(spec) -> (model, tokenizer, prompts)`` for every kind of model source.

spec is a preset (``config.PRESETS``; random init for presets without shipped weights), an HF
LLaMA directory (an llara_fast export brings its prompts in llara_fast.json), a ``.gguf`` file,
or a training checkpoint RUN/checkpoints/step_N (its weights, LoRA merged, and the tokenizer and
prompts of its run). The tokenizer always holds <s1>..<s16> and the embedding has their rows.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import tomllib
import torch

from llara_fast.config import PRESETS, ModelArgs
from llara_fast.data.shards import tokenizer_fingerprint
from llara_fast.errors import ConfigError, InputNotFound, UserError
from llara_fast.io.checkpoint import COMPLETE, is_training_checkpoint, latest_checkpoint, manifest, read_model
from llara_fast.io.hf import (
    META_FILE,
    add_special_tokens,
    grow_embeddings,
    hub_commit,
    is_hub_id,
    load_hf_model,
    load_tokenizer,
    resolve_source,
    tokenizer_source,
)
from llara_fast.model import Transformer
from llara_fast.templates import SPECIAL_TOKENS, PromptConfig, Template


def load(spec: str, attn_backend: str = "auto", *, tokenizer: str | None = None, random_init: bool = False,
         layers: int = 0, seed: int = 0, revision: str = "main",
         notice: bool = True) -> tuple[Transformer, object, PromptConfig]:
    """(model, tokenizer, prompts). ``tokenizer``: another tokenizer for a preset without weights
    (default: SmolLM2's) or for any source; ``random_init``: a preset's shape from random weights
    (speed runs without the weights package); ``layers``: keep the first L blocks (0: all; a
    random model is built with L blocks directly); ``seed``: the random init; ``revision``: the
    branch, tag or commit of a Hub model id; ``notice``: say random weights in one stderr line
    (rank 0; the training jobs say it in their own log and pass False)."""
    spec = str(run_checkpoint(spec))
    if is_training_checkpoint(spec):
        if tokenizer or random_init:
            raise UserError(f"{spec}: a training checkpoint brings its own weights and tokenizer; "
                            "drop the tokenizer / random_init setting")
        model, tok, prompts = _load_training_checkpoint(Path(spec), attn_backend)
        check_finite(model, spec)
        return keep_layers(model, layers), tok, prompts
    if random_init and spec not in PRESETS:
        raise UserError(f"{spec}: random_init takes a preset ({', '.join(PRESETS)}), not a checkpoint")
    src = None if random_init else resolve_source(spec, revision)
    if src is None:
        args = ModelArgs.from_preset(spec, weights=None)
        _check_layers(layers, args.n_layers)
        args.n_layers = layers or args.n_layers
        model = Transformer(args, attn_backend=attn_backend)
        model.init_weights(seed=seed)
        if notice and int(os.environ.get("RANK", "0")) == 0:
            why = ("a preset without shipped weights" if PRESETS[spec].weights is None
                   else "random_init asked for them")
            print(f"model: random weights (preset {spec}'s shape, seed {seed}): {why}; pass an HF directory, .gguf "
                  "or Hub id for trained weights", file=sys.stderr, flush=True)
        tok_src = tokenizer_source(tokenizer) if tokenizer else resolve_source("smollm2-135m")
    else:
        model = keep_layers(load_hf_model(src, attn_backend=attn_backend), layers)
        tok_src = tokenizer_source(tokenizer) if tokenizer else src
    tok = load_tokenizer(tok_src)
    ids = add_special_tokens(tok)
    need = max(len(tok), ids[-1] + 1)
    if src is None or need > model.args.vocab_size:  # a random model's table is sized to its tokenizer
        grow_embeddings(model, need)
    prompts = (read_prompts(src) if src is not None else None) or PromptConfig()
    if src is not None:
        check_export_tokenizer(src, tok, prompts)
    check_finite(model, spec)
    return model, tok, prompts


def pin_revision(name: str, revision: str = "main") -> str:
    """The commit a Hub model id resolves to at ``revision`` (fetched into the HF cache as load()
    would); for any other model spec ``revision`` must be "main" and is returned as is."""
    if is_hub_id(name):
        return hub_commit(resolve_source(name, revision)) or revision
    if revision != "main":
        raise ConfigError(f"model.revision {revision!r} applies to Hub model ids; model.name {name!r} is a preset or "
                          "a local path (leave model.revision at main)")
    return revision


def run_checkpoint(spec: str | os.PathLike) -> str | os.PathLike:
    """A run directory RUN (config.toml, checkpoints/) stands for its newest complete checkpoint
    RUN/checkpoints/step_N; any other spec is returned as is."""
    p = Path(spec)
    if not ((p / "config.toml").is_file() and (p / "checkpoints").is_dir()) or (p / "config.json").is_file():
        return spec
    ck = latest_checkpoint(p)
    if ck is None:
        raise InputNotFound(f"{p}: a training run without a complete checkpoint (nothing under {p / 'checkpoints'} "
                            "has its COMPLETE marker); let the run save one, or name an HF directory")
    return ck


def check_finite(model, spec) -> None:
    """Refuse weights that hold NaN or inf, naming the first such tensor: they give plausible
    looking numbers downstream (a zero nDCG, NaN embeddings, a run stopped as if the lr were too high)."""
    for name, p in model.named_parameters():
        bad = int((~torch.isfinite(p.detach())).sum())
        if bad:
            raise UserError(f"{spec}: weight {name} {tuple(p.shape)} holds {bad} non-finite value(s) (NaN/inf); "
                            "these weights are damaged")


def check_export_tokenizer(path: Path, tok, prompts: PromptConfig) -> None:
    """Refuse a tokenizer that is not the one an llara_fast export recorded (its fingerprint, the ids
    of <s1>..<s16> and of the prompt pieces): swapped tokenizer files would encode silently wrong."""
    fp = path / META_FILE
    if not fp.is_file():
        return
    meta = json.loads(fp.read_text())
    tpl = Template.from_tokenizer(tok, prompts)
    got = {"tokenizer_fingerprint": tokenizer_fingerprint(tok),
           "special_ids": tok.convert_tokens_to_ids(SPECIAL_TOKENS), "prefix_ids": list(tpl.prefix_ids),
           "sum_ids": list(tpl.sum_ids), "pred_ids": list(tpl.pred_ids)}
    for key, value in got.items():
        if key in meta and meta[key] != value:
            raise UserError(f"{path}: the tokenizer's {key} is not the one {META_FILE} records for this model; the "
                            "tokenizer files do not belong to these weights")


def keep_layers(model: Transformer, layers: int) -> Transformer:
    """Keep the first ``layers`` blocks of a loaded model (0: all); quick runs and benchmarks."""
    _check_layers(layers, model.args.n_layers)
    if layers:
        del model.layers[layers:]
        model.args.n_layers = layers
    return model


def _check_layers(layers: int, n_layers: int) -> None:
    if not 0 <= layers <= n_layers:
        raise UserError(f"layers must be in 1..{n_layers} (0: all), got {layers}")


def read_prompts(path: str | os.PathLike) -> PromptConfig | None:
    """The prompts recorded in an export's llara_fast.json, or None when there is none."""
    fp = Path(path) / META_FILE
    if not fp.is_file():
        return None
    with open(fp) as f:
        meta = json.load(f)
    return PromptConfig(**meta["prompts"])


def run_config(checkpoint: Path) -> dict:
    """RUN/config.toml of a checkpoint RUN/checkpoints/step_N."""
    path = checkpoint.parent.parent / "config.toml"
    if not path.is_file():
        raise UserError(f"{path}: missing; a training checkpoint is read with its run's config "
                        "(RUN/checkpoints/step_N next to RUN/config.toml)")
    return tomllib.loads(path.read_text())


def _load_training_checkpoint(path: Path, attn_backend: str):
    if not (path / COMPLETE).is_file():
        raise UserError(f"{path}: no {COMPLETE} marker; the trainer did not finish writing this checkpoint")
    cfg = run_config(path)
    model = read_model(path, cfg.get("lora"), attn_backend)
    model_cfg = cfg.get("model", {})
    tok = checkpoint_tokenizer(model_cfg.get("name", "smollm2-135m"), model_cfg.get("tokenizer", ""),
                               model_cfg.get("revision", "main"))
    recorded = (manifest(path).get("identity") or {}).get("tokenizer")
    if recorded is not None and recorded != tokenizer_fingerprint(tok):
        raise UserError(f"{path}: the run's config.toml names a tokenizer that is not the one this checkpoint was "
                        "trained with (fingerprints differ)")
    prompts = PromptConfig(**cfg["prompts"]) if "prompts" in cfg else PromptConfig()
    return model, tok, prompts


def checkpoint_tokenizer(name: str, tokenizer: str = "", revision: str = "main"):
    """The tokenizer (with <s1>..<s16>) a run trained with: its `model.tokenizer` when set, else
    that of the model it started from (a preset / HF dir / GGUF / Hub id at the run's recorded
    revision, or, for a run started from another run's checkpoint, that run's tokenizer)."""
    name = str(run_checkpoint(name))
    if not tokenizer and is_training_checkpoint(name):
        model_cfg = run_config(Path(name)).get("model", {})
        return checkpoint_tokenizer(model_cfg.get("name", "smollm2-135m"), model_cfg.get("tokenizer", ""),
                                    model_cfg.get("revision", "main"))
    src = tokenizer_source(tokenizer) if tokenizer else resolve_source(name, revision)
    tok = load_tokenizer(src or resolve_source("smollm2-135m"))  # as load() does
    add_special_tokens(tok)
    return tok
