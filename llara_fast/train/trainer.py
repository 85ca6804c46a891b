"""The Trainer: one training run of any objective, used by llara_fast.pretrain, llara_fast.finetune
and benchmarks/throughput.py (which so measures exactly what training runs).

    trainer = Trainer(cfg, "pretrain", default_steps=(12, 200))   # process group, device, dtype
    trainer.claim()                                                # lock RUN, refuse another run's dir
    trainer.build(model, module, objective)                        # AC -> compile -> FSDP, AdamW, schedule
    summary = trainer.fit(loader, next_batches, describe, identity, oom_hint)

fit() resumes from the newest checkpoint that verifies (file hashes) and matches the run's
identity (model args, tokenizer, data) when ``run.resume`` is set, writes RUN/config.toml, then
loops: one optimizer step (llara_fast.train.step), the non-finite guard, one metrics.jsonl record
and log line per step, a progress bar, checkpoints every ``run.ckpt_every`` steps and at the end;
SIGTERM / SIGINT finish the step, save it and exit with Preempted.exit_code (75).
``Trainer.hooks`` are called after each step as hook(trainer, step, micro_batches, stats): the
tests inject faults and fingerprint the data there, outside the product's hot path.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable

import tomllib
import torch
import torch.distributed as dist
from tqdm import tqdm

from llara_fast.attention import resolve_backend
from llara_fast.config import PRESETS
from llara_fast.errors import ConfigError, UserError
from llara_fast.io.checkpoint import (
    TrainState,
    check_identity,
    clean_partial,
    complete_checkpoints,
    latest_checkpoint,
    latest_verified_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from llara_fast.io.lock import DirLock
from llara_fast.kernels import use_triton
from llara_fast.runtime import tune_cpu_malloc
from llara_fast.train.config import HISTORY, compile_enabled, load_config, to_toml
from llara_fast.train.epochs import EpochClock
from llara_fast.train.parallel import parallelize
from llara_fast.train.report import Reporter, check_report_to, plot_losses
from llara_fast.train.step import StepStats, build_optimizer, lr_lambda, optimizer_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_type: str) -> tuple[int, int]:
    """torchrun sets RANK/WORLD_SIZE; a plain `python -m` run becomes a 1-process group."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def init_run(run) -> tuple[int, int, torch.device, torch.dtype]:
    """Process group, device and parameter dtype from a RunConfig: (rank, world, device, dtype)."""
    if run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device is cuda, but this machine has no usable CUDA device (torch.cuda.is_available() "
                          "is false); use --run.device auto or cpu")
    dev_type = run.device if run.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = dev_type == "cuda"
    auto = torch.bfloat16 if on_gpu else torch.float32
    dtype = auto if run.dtype == "auto" else DTYPES.get(run.dtype)
    if dtype is None:
        raise ConfigError(f"run.dtype must be auto, float32, bfloat16 or float64, got {run.dtype!r}")
    if dtype == torch.float64 and on_gpu:
        raise ConfigError("run.dtype float64 runs on the CPU only (exact comparisons); on CUDA use bfloat16 or "
                          "float32, or pass --run.device cpu")
    rank, world = init_distributed(dev_type)
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        tune_cpu_malloc()
    device = torch.device(dev_type, torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    return rank, world, device, dtype


def fast_path(cfg, device: torch.device, dtype: torch.dtype) -> dict:
    """What the config's auto settings resolve to on this device: the attention backend, compile
    of the blocks, the losses' implementation (jobs with a loss section), compute dtype, FSDP2
    resharding and activation checkpointing. Bad names are config errors, before any work."""
    m = cfg.model
    try:
        attn = resolve_backend(m.attn, device, dtype)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"model.attn: {e}") from None
    out = {"attention": attn, "compile": compile_enabled(m.compile, device.type),
           "dtype": str(dtype).removeprefix("torch."), "reshard": m.reshard, "ac": m.ac}
    impl = getattr(getattr(cfg, "loss", None), "impl", None)
    if impl is not None:
        out["losses"] = impl if impl == "reference" else ("triton" if use_triton(device, impl, dtype) else
                                                          "torch (chunked)")
    return out


def describe_fast_path(fp: dict) -> str:
    return ", ".join(f"{k} {('on' if v else 'off') if isinstance(v, bool) else v}" for k, v in fp.items())


def check_run_length(cfg, default_warmup: int) -> None:
    """run.epochs / run.steps and optim.warmup_ratio / optim.warmup_steps: one of each pair (a
    warmup_steps other than the job's default counts as given)."""
    run, o = cfg.run, cfg.optim
    if run.epochs < 0 or run.steps < 0:
        raise ConfigError(f"run.epochs ({run.epochs:g}) and run.steps ({run.steps}) must be >= 0")
    if run.epochs and run.steps:
        raise ConfigError(f"run.steps {run.steps} and run.epochs {run.epochs:g} are both set: give one (run.steps 0 "
                          "derives the steps from the epochs)")
    if not 0 <= o.warmup_ratio < 1:
        raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {o.warmup_ratio:g}")
    if o.warmup_ratio and o.warmup_steps != default_warmup:
        raise ConfigError(f"optim.warmup_steps {o.warmup_steps} and optim.warmup_ratio {o.warmup_ratio:g} are both "
                          f"set: give one (warmup_steps {default_warmup} is the default, left when the ratio is set)")


class Preempted(UserError):
    """The run was asked to stop (SIGTERM, SIGINT) and saved its last step."""
    exit_code = 75  # EX_TEMPFAIL: try again (with --run.resume true)


class StopSignals:
    """SIGTERM and SIGINT set a flag instead of killing the process; agreed() tells, after a step,
    whether any rank got one (torchrun forwards the signal to every rank, not always at once)."""

    def __init__(self):
        self.signum, self._old = 0, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the default
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def agreed(self, device: torch.device) -> int:
        flag = torch.tensor([self.signum], device=device if device.type == "cuda" else "cpu")
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


RUN_FILES = ("config.toml", "metrics.jsonl", "checkpoints", "export", "best", "loss.png", "tensorboard", "wandb")


def claim_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """A fresh run needs an empty run directory (or run.overwrite, which clears the old run's files);
    a resume keeps them. Leftovers of an interrupted save are removed either way."""
    present = [n for n in RUN_FILES if (out / n).exists()]
    if present and not resume:
        if not overwrite:
            raise UserError(f"{out}: holds another run ({', '.join(present)}); pass --run.resume true to continue "
                            "it, --run.overwrite true to replace it, or choose another run.out_dir")
        for n in present:
            p = out / n
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    clean_partial(out)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics rows up to ``step`` (a resumed run re-runs the later ones)."""
    if not path.is_file():
        return
    rows = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, path)


def _broadcast(obj):
    """Rank 0's obj on every rank."""
    if dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# Settings a resumed run may change (they take effect from the resume step); every other setting
# is part of what was trained (model, data, loss, batch, dtype, seed) and a change is refused.
MUTABLE = {"optim.*", "run.steps", "run.log_every", "run.ckpt_every", "run.keep_checkpoints", "run.resume",
           "run.overwrite", "run.out_dir", "run.max_nonfinite", "run.diverge_loss", "run.diverge_grad_norm",
           "run.diverge_patience", "run.device", "data.verify", "run.report_to", "eval.*", "run.epochs", "run.export"}


def _mutable(key: str) -> bool:
    return key in MUTABLE or f"{key.split('.')[0]}.*" in MUTABLE


def resume_changes(old: dict, cfg) -> dict:
    """{key: (old, new)} of the mutable settings a resume changes; a change of any other setting is
    a ConfigError naming the key and both values."""
    new = dataclasses.asdict(absolute_paths(cfg))
    changes = {}
    for section, table in new.items():
        before = old.get(section, {})
        for key, value in table.items():
            if key not in before or before[key] == value:
                continue
            name = f"{section}.{key}"
            if name in ("run.resume", "run.overwrite"):  # how this invocation starts, not a setting of the run
                continue
            if isinstance(value, float) and isinstance(before[key], (int, float)) and float(before[key]) == value:
                continue
            if name in PATH_KEYS and isinstance(before[key], str) and before[key] and Path(before[key]).exists() \
                    and Path(before[key]).resolve() == Path(value).resolve():
                continue  # the same path, written relative by an older config.toml
            if not _mutable(name):
                raise ConfigError(f"run.resume: {name} was {before[key]!r} in this run and is {value!r} now; it cannot "
                                  "change mid-run (start a new run with another run.out_dir to train with it)")
            changes[name] = (before[key], value)
    return changes


# The settings that name files or directories (model.name may also be a preset).
PATH_KEYS = {"run.out_dir", "model.name", "model.tokenizer", "data.dir", "data.input", "data.train", "data.beir",
             "eval.beir"}


def absolute_paths(cfg):
    """A copy of cfg whose path settings (PATH_KEYS; run.out_dir always, the others when they name
    an existing file or directory) are absolute, so config.toml means the same from any directory."""
    cfg = copy.deepcopy(cfg)
    for key in PATH_KEYS:
        section, name = key.split(".")
        sub = getattr(cfg, section, None)
        v = getattr(sub, name, None) if sub is not None else None
        if isinstance(v, str) and v and (key == "run.out_dir" or (v not in PRESETS and Path(v).exists())):
            setattr(sub, name, str(Path(v).resolve()))
    return cfg


class NonfiniteGuard:
    """Counts consecutive skipped (non-finite) steps; stops the run after `limit` in a row."""

    def __init__(self, trainer: "Trainer"):
        self.trainer, self.in_a_row = trainer, 0

    def update(self, step: int, stats: StepStats) -> None:
        if not stats.skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.trainer.log(f"step {step}: non-finite loss/grad ({stats.parts[0]}, {stats.grad_norm}); update "
                         f"skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.trainer.cfg.run.max_nonfinite:
            good = latest_verified_checkpoint(self.trainer.out, lambda _: None)
            raise UserError(f"{self.in_a_row} non-finite steps in a row at step {step}; stopping. The last good "
                            f"checkpoint is {good}; lower optim.lr or check the data")


class Diverged(UserError):
    """The run diverged: nothing was saved from the first suspect step on."""


class DivergenceGuard:
    """Stops a run that diverged, before it saves a dead model: a step whose loss exceeds
    run.diverge_loss x the median of the previous WINDOW finite losses (a median below 1 counts as
    1, so near-zero contrastive losses do not make noise look like a blow-up), or whose gradient norm
    exceeds run.diverge_grad_norm or is exactly 0 for run.diverge_patience steps in a row. A step
    that meets either condition (even before the patience runs out) is never checkpointed."""

    WINDOW = 20

    def __init__(self, trainer: "Trainer"):
        self.trainer, self.losses, self.bad_grads = trainer, [], 0

    def check(self, step: int, stats: StepStats) -> bool:
        """True when the step is suspect (not to be saved); raises Diverged when the rules say so."""
        run = self.trainer.cfg.run
        if stats.skipped:  # the non-finite guard's business
            return True
        loss, gn = stats.parts[0], stats.grad_norm
        seen = None
        if run.diverge_loss > 0 and self.losses:
            med = sorted(self.losses)[len(self.losses) // 2]
            if loss > run.diverge_loss * max(med, 1.0):
                seen = (f"loss {loss:.4g} > {run.diverge_loss:g} x the median {med:.4g} of the previous "
                        f"{len(self.losses)} steps (run.diverge_loss)")
        grad_bad = run.diverge_grad_norm > 0 and (gn == 0.0 or gn > run.diverge_grad_norm)
        self.bad_grads = self.bad_grads + 1 if grad_bad else 0
        if seen is None and self.bad_grads >= max(run.diverge_patience, 1):
            seen = (f"gradient norm {gn:.4g} ({'exactly 0' if gn == 0.0 else f'> {run.diverge_grad_norm:g}'}) "
                    f"for {self.bad_grads} steps in a row (run.diverge_grad_norm, run.diverge_patience)")
        if seen is not None:
            good = latest_checkpoint(self.trainer.out)
            then = (f"the newest checkpoint, {good}, is from before it: resume from it with a lower optim.lr" if good
                    else "no checkpoint was saved: start again with a lower optim.lr")
            raise Diverged(f"diverged at step {step}: {seen}; nothing saved since, {then} (or raise the "
                           "divergence thresholds if this is expected)")
        self.losses = (self.losses + [loss])[-self.WINDOW:]
        return grad_bad


class Trainer:
    hooks: list[Callable] = []  # hook(trainer, step, micro_batches, stats), after each step
    # The job's evaluation during training (llara_fast.train.evaluation.Evaluator), or None: every
    # rank calls evaluator.begin(trainer, start) before the loop and evaluator(step) every
    # evaluator.every steps and at the last, which returns (fields, log line) on rank 0.
    evaluator = None

    def __init__(self, cfg, job: str, default_steps: tuple[int, int]):
        """cfg: a job config with model, optim and run sections; default_steps: (CPU, GPU) for run.steps 0."""
        self.cfg, self.job = cfg, job
        self.rank, self.world, self.device, self.dtype = init_run(cfg.run)
        self.on_gpu = self.device.type == "cuda"
        self.fast_path = fast_path(cfg, self.device, self.dtype)
        check_run_length(cfg, type(cfg)().optim.warmup_steps)
        self.steps = cfg.run.steps or default_steps[self.on_gpu]
        if not cfg.run.epochs:  # with epochs the steps are derived anew at each start (set_epochs)
            cfg.run.steps = self.steps  # the saved config is the resolved one
        self.clock = None
        self.out = Path(cfg.run.out_dir)
        check_report_to(cfg.run.report_to)  # a bad name or a missing package, before any work
        self.report, self.loss_parts = None, ()

    def log(self, msg: str) -> None:
        if self.rank == 0:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def claim(self) -> None:
        """Make the run directory this run's: a lock held for the run's life (a second run on it fails
        at once, naming the holder), and a fresh run refused where another run's files are, unless
        run.resume or run.overwrite. RUN/config.toml is written later, once every check passed."""
        msg = None
        if self.rank == 0:
            try:
                self._lock = DirLock(self.out, "run directory")
                claim_run_dir(self.out, self.cfg.run.resume, self.cfg.run.overwrite)
            except UserError as e:
                msg = str(e)
        msg = _broadcast(msg)
        if msg is not None:
            raise UserError(msg)

    def _old_config(self) -> dict | None:
        path = self.out / "config.toml"
        return tomllib.loads(path.read_text()) if path.is_file() else None

    def _write_config(self, old: dict | None = None, changes: dict | None = None, start: int = 0) -> None:
        """RUN/config.toml: the resolved settings (paths absolute, so a resume works from any
        directory), then the [[resumed]] history: the step of each resume and what it changed."""
        if self.rank != 0:
            return
        history = list((old or {}).get(HISTORY, [])) if self.cfg.run.resume else []
        if self.cfg.run.resume and old is not None:
            changed = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in (changes or {}).items()]
            history.append({"step": start, "changed": changed})
        text = to_toml(absolute_paths(self.cfg))
        for h in history:
            text += f"\n[[{HISTORY}]]\nstep = {int(h['step'])}\nchanged = {json.dumps(list(h['changed']))}\n"
        tmp = self.out / f".config.toml.tmp{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, self.out / "config.toml")

    def set_epochs(self, clock: EpochClock) -> None:
        """Where each step ends in the data (the epoch of each metrics record); with run.epochs, the
        run's steps, said at start. Before build()."""
        self.clock, epochs = clock, self.cfg.run.epochs
        if epochs:
            self.steps = clock.steps_for(epochs)
            self.log(f"run: {epochs:g} epochs = {self.steps} steps ({clock.about})")

    def warmup(self) -> int:
        """The schedule's warmup steps: optim.warmup_ratio of the run (rounded up), else optim.warmup_steps."""
        o = self.cfg.optim
        return math.ceil(o.warmup_ratio * self.steps) if o.warmup_ratio else o.warmup_steps

    def _schedule(self):
        o, warmup = self.cfg.optim, self.warmup()
        if warmup > self.steps:
            self.log(f"warmup {warmup} steps > run {self.steps} steps: the peak lr is never reached")
        return lr_lambda(warmup, self.steps, o.decay, o.min_lr_ratio)

    def _apply_changes(self, changes: dict, start: int) -> None:
        """Settings a resume may change take effect from the resume step: the optimizer's lr, betas
        and weight decay, and the schedule (warmup, decay, steps) at the restored step."""
        o = self.cfg.optim
        if any(k.startswith("optim.") or k in ("run.steps", "run.epochs") for k in changes):
            sched = self.scheduler
            sched.lr_lambdas = [self._schedule()] * len(sched.lr_lambdas)
            sched.base_lrs = [o.lr] * len(sched.base_lrs)
            for g, base, f in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                g["initial_lr"], g["lr"], g["betas"] = base, base * f(sched.last_epoch), (o.beta1, o.beta2)
                if g["weight_decay"] != 0.0 or "optim.weight_decay" in changes:
                    g["weight_decay"] = o.weight_decay if g is self.optimizer.param_groups[0] else 0.0
            sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        for k, (a, b) in changes.items():
            self.log(f"resume: {k} {a!r} -> {b!r}, from step {start + 1}")

    def build(self, model: torch.nn.Module, module: torch.nn.Module, objective) -> None:
        """Parallelize ``module`` (the train module around ``model``) onto the device, AdamW and
        the learning-rate schedule over self.steps."""
        m, o = self.cfg.model, self.cfg.optim
        self.model, self.objective = model, objective
        self.loss_parts = tuple(getattr(objective, "loss_parts", ()))  # beside the total in RUN/loss.png
        self.log(f"{self.job} on {self.device.type}: {describe_fast_path(self.fast_path)}")
        # fp32 master weights (bf16 only in compute); a float64 run's are float64
        module = module.to(self.device, torch.float64) if self.dtype == torch.float64 else module.to(self.device)
        self.module = parallelize(model, module, m.ac, self.fast_path["compile"], self.dtype, m.reshard)
        self.optimizer = build_optimizer(self.module, o.lr, o.weight_decay, (o.beta1, o.beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._schedule())

    def step(self, micro_batches) -> StepStats:
        return optimizer_step(self.module, micro_batches, self.optimizer, self.scheduler, self.objective,
                              device=self.device, grad_clip=self.cfg.optim.grad_clip)

    def _resume(self, state: TrainState, identity: dict) -> int:
        """Load the newest checkpoint that verifies and belongs to this configuration; drop the
        metrics rows after its step (they are re-run)."""
        ck = latest_verified_checkpoint(self.out, self.log)
        if ck is None:
            if complete_checkpoints(self.out):
                raise UserError(f"run.resume: no checkpoint under {self.out / 'checkpoints'} verifies (see above)")
            what = "holds no run yet" if not (self.out / "config.toml").is_file() else "has no complete checkpoint"
            self.log(f"run.resume: {self.out.resolve()} {what}; starting fresh")
            if self.rank == 0:
                truncate_metrics(self.out / "metrics.jsonl", 0)  # rows of steps no checkpoint holds
            return 0
        check_identity(ck, identity)
        start = load_checkpoint(ck, state)["step"]
        if self.rank == 0:
            truncate_metrics(self.out / "metrics.jsonl", start)
        self.log(f"resumed from {ck} (step {start})")
        return start

    def _describe(self, step: int, stats: StepStats, describe: Callable, lr: float) -> tuple[dict, str]:
        """The job's fields and log line of a step, with the learning rate it used and (GPU) peak memory."""
        fields, line = describe(stats)
        mem = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.on_gpu else None
        epoch = {"epoch": round(self.clock.epoch_at(step), 6)} if self.clock is not None else {}
        rec = {"step": step, **epoch, **fields, "lr": lr, "step_s": stats.seconds, "mem_gb": mem, "skipped": stats.skipped}
        return rec, f"step {step:5d} | {line} | lr {lr:.2e}" + (f" | mem {mem:.1f} GB" if mem is not None else "")

    def _record(self, rec: dict, line: str, show: bool) -> None:
        """Rank 0 appends the record to metrics.jsonl, hands it to the trackers (run.report_to) and,
        when `show`, prints its log line."""
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.report is not None:
                self.report.log(rec)
            if show:
                self.log(line)

    def _evaluate(self, step: int) -> None:
        out = self.evaluator(step)
        if self.rank == 0:
            fields, line = out
            self._record({"step": step, "eval": fields}, f"step {step:5d} | eval | {line}", True)

    def fit(self, loader, next_batches: Callable[[], list], describe: Callable, identity: dict,
            oom_hint: str) -> dict:
        """Train self.steps steps. next_batches() gives this rank's micro-batches of one step;
        describe(stats) -> (the job's metrics fields, its part of the log line); identity: what a
        checkpoint must match to be resumed (model args, tokenizer fingerprint, data identity);
        oom_hint: what to change when the GPU runs out of memory. SIGTERM / SIGINT finish the
        step, save a checkpoint and raise Preempted."""
        run = self.cfg.run
        state = TrainState(self.module, self.optimizer, self.scheduler, loader)
        identity = {"model_args": dataclasses.asdict(self.model.args), **identity}
        old = self._old_config() if run.resume else None
        changes = resume_changes(old, self.cfg) if old is not None else {}
        start = self._resume(state, identity) if run.resume else 0
        if start and self.steps <= start:
            length = f"run.epochs {run.epochs:g} = {self.steps} steps" if run.epochs else f"run.steps is {self.steps}"
            more = "a larger --run.epochs" if run.epochs else f"--run.steps N with N > {start}"
            raise UserError(f"{length}, but the checkpoint is at step {start}: nothing to do; pass {more} to train "
                            "further")
        if changes:
            self._apply_changes(changes, start)
        self._write_config(old, changes, start)  # every check passed
        if self.evaluator is not None:
            self.evaluator.begin(self, start)
        failed = True
        try:
            if self.rank == 0:
                self.report = Reporter(self.cfg, self.out, start)
            with StopSignals() as stop:
                summary = self._loop(state, start, (next_batches, describe, identity, oom_hint), stop)
            failed = False
            return summary
        except Preempted:
            failed = False
            raise
        finally:
            self._close_report(failed)

    def _close_report(self, failed: bool) -> None:
        """Rank 0 closes the trackers and draws RUN/loss.png, however the loop ended (a picture
        that cannot be drawn is said, never raised over the run's own outcome)."""
        if self.rank != 0:
            return
        if self.report is not None:
            self.report.close(failed)
            self.report = None
        try:
            path = plot_losses(self.out, self.loss_parts)
        except Exception as e:  # noqa: BLE001 - the run's outcome matters more than its picture
            self.log(f"loss.png: not written ({type(e).__name__}: {e})")
            return
        if path is not None:
            self.log(f"wrote {path}")

    def _loop(self, state: TrainState, start: int, job: tuple, stop: "StopSignals") -> dict:
        next_batches, describe, identity, oom_hint = job
        run = self.cfg.run
        guard, diverge, last = NonfiniteGuard(self), DivergenceGuard(self), {}
        bar = tqdm(total=self.steps, initial=start, desc=self.job, unit="step", disable=self.rank != 0,
                   file=sys.stderr)
        wall0 = time.perf_counter()
        try:
            for step in range(start + 1, self.steps + 1):
                batches = next_batches()
                lr_used = self.optimizer.param_groups[0]["lr"]  # the step's own (the scheduler moves on after it)
                stats = self.step(batches)
                guard.update(step, stats)
                last, line = self._describe(step, stats, describe, lr_used)
                show = step % run.log_every == 0 or step == self.steps
                self._record(last, line, show)
                try:
                    suspect = diverge.check(step, stats)
                except Diverged:
                    if not show:
                        self.log(line)
                    raise
                bar.update(1)
                signum = stop.agreed(self.device)
                if self.evaluator is not None and not signum and (step == self.steps or (
                        self.evaluator.every and step % self.evaluator.every == 0)):
                    self._evaluate(step)  # before the checkpoint: a crash in between re-runs the step and its eval
                due = (run.ckpt_every and step % run.ckpt_every == 0) or step == self.steps or signum
                if due and suspect and not stats.skipped:
                    self.log(f"step {step}: not saved (gradient norm {stats.grad_norm:.4g}: run.diverge_grad_norm)")
                if due and not suspect:  # a non-finite or diverging step never becomes a checkpoint
                    path = save_checkpoint(self.out, step, state, run.keep_checkpoints, identity)
                    self.log(f"saved {path}")
                for hook in Trainer.hooks:
                    hook(self, step, batches, stats)
                if signum:
                    raise Preempted(f"stopped by {signal.Signals(signum).name} after step {step}; the newest "
                                    f"checkpoint is {latest_checkpoint(self.out)}: rerun with --run.resume true")
        except torch.cuda.OutOfMemoryError as e:
            raise UserError(f"out of GPU memory ({str(e).splitlines()[0]}). {oom_hint}") from None
        finally:
            bar.close()
        return {"steps": self.steps, "wall_s": time.perf_counter() - wall0, "final": last,
                "checkpoint": str(latest_checkpoint(self.out)), "world_size": self.world}


def cli(argv: list[str] | None, config_cls, run_fn: Callable, prog: str, doc: str) -> int:
    """The command-line shell of a training job: --help prints the doc and the defaults with each
    key's help; a config error exits 2, any other UserError 1, each as one line; everything else
    raises with its traceback. The process group is always torn down."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(doc)
        print(to_toml(config_cls(), with_help=True))
        cfg = config_cls()
        gpu = torch.cuda.is_available()
        dev = torch.device("cuda" if gpu else "cpu")
        where = f"CUDA ({torch.cuda.get_device_name(0)})" if gpu else "no CUDA device"
        print(f"# on this machine ({where}) the defaults pick: "
              f"{describe_fast_path(fast_path(cfg, dev, torch.bfloat16 if gpu else torch.float32))}")
        return 0
    try:
        summary = run_fn(load_config(argv, config_cls))
        if dist.get_rank() == 0:
            print(json.dumps(summary), flush=True)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return Preempted.exit_code
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
