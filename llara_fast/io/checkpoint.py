"""Training checkpoints, both directions: written and resumed by the trainer, read for their
weights by export / encode / fine-tuning.

Layout of RUN/checkpoints/step_N (torch.distributed.checkpoint):
- the DCP state {"model": the train module's state dict (keys "model.<ours>"), "optim": ...};
- rank<r>.pt: step, scheduler, data position, RNG states, "model_args" (the ModelArgs);
- COMPLETE: written last, by rank 0, once every rank is done (a directory without it is
  ignored); RUN/config.toml next to RUN/checkpoints names the model (and tokenizer) of the run.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from llara_fast.config import ModelArgs
from llara_fast.errors import UserError
from llara_fast.lora import apply_lora, merge_lora
from llara_fast.model import Transformer, rope_inv_freq

COMPLETE = "COMPLETE"


@dataclass
class TrainState:
    """What a checkpoint saves and a resume restores."""
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: object  # has state_dict() / load_state_dict()


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step_{step:07d}"


def latest_checkpoint(out: Path) -> Path | None:
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """A trainer checkpoint directory (RUN/checkpoints/step_N): a ``.metadata`` file and no config.json."""
    p = Path(path)
    return p.is_dir() and (p / ".metadata").is_file() and not (p / "config.json").is_file()


def _why(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]  # DCP nests whole tracebacks
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def save_checkpoint(out: Path, step: int, state: TrainState, keep: int, extra: dict) -> Path:
    """All ranks write into step_N.tmp; rank 0 marks it COMPLETE and renames it once every rank
    is done, so a crash mid-save never leaves a directory that looks complete. Keeps the
    ``keep`` newest complete checkpoints (0: all)."""
    rank = dist.get_rank()
    final = checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    msd, osd = get_state_dict(state.module, state.optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    torch.save({"step": step, "scheduler": state.scheduler.state_dict(), "data": state.loader.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None, **extra},
               tmp / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "world_size": dist.get_world_size()}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(p for p in (Path(out) / "checkpoints").glob("step_*") if (p / COMPLETE).is_file())
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, state: TrainState) -> dict:
    """Restore a trainer checkpoint into ``state`` (model, optimizer, scheduler, data position,
    RNG); returns this rank's extra record (its "step" among them)."""
    marker = path / COMPLETE
    try:
        meta = json.loads(marker.read_text())
        if meta["world_size"] != dist.get_world_size():
            raise UserError(f"{path}: saved with {meta['world_size']} ranks, resuming with "
                            f"{dist.get_world_size()} (the data position is per rank)")
        msd, osd = get_state_dict(state.module, state.optimizer)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(path))
        set_state_dict(state.module, state.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        extra = torch.load(path / f"rank{dist.get_rank()}.pt", weights_only=False)
    except UserError:
        raise
    except (Exception, CheckpointException) as e:
        raise UserError(f"{path}: unreadable checkpoint ({_why(e)}); delete it to resume from an earlier one, or "
                        "start without run.resume") from None
    state.scheduler.load_state_dict(extra["scheduler"])
    state.loader.load_state_dict(extra["data"])
    torch.set_rng_state(extra["rng"])
    if extra.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["cuda_rng"])
    return extra


def meta_model(args: ModelArgs, lora: dict | None = None, attn_backend: str = "auto") -> Transformer:
    """A Transformer on the meta device shaped as a training run saved it: with the LoRA adapters
    when the run used them (``lora``: the run's [lora] section, rank > 0)."""
    with torch.device("meta"):
        model = Transformer(args, attn_backend=attn_backend)
        if lora and lora.get("rank", 0) > 0:  # same keys as the plain model, plus the adapters
            apply_lora(model, lora["rank"], lora["alpha"], 0.0, lora["targets"])
    return model


def materialise(model: Transformer, state: dict) -> Transformer:
    """Assign ``state`` (the trainer's keys; a "model." prefix is dropped) to a ``meta_model``,
    fold any LoRA adapters into plain weights and set the RoPE buffer. Returns the model."""
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, assign=True)
    merge_lora(model)  # no-op without adapters
    model.rope_inv_freq = rope_inv_freq(model.args)
    return model


def read_model(path: str | os.PathLike, lora: dict | None = None, attn_backend: str = "auto") -> Transformer:
    """The model weights of a trainer checkpoint, in one process (no optimizer state), LoRA merged."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise UserError(f"{path}: no {COMPLETE} marker; the trainer did not finish writing this checkpoint")
    if not (path / "rank0.pt").is_file():
        raise UserError(f"{path / 'rank0.pt'}: missing (it records the checkpoint's ModelArgs)")
    extra = torch.load(path / "rank0.pt", map_location="cpu", weights_only=False)
    args = ModelArgs(**extra["model_args"])
    model = meta_model(args, lora, attn_backend)
    state = {"model": {f"model.{k}": torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}}
    try:
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": a single-process read
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:
        raise UserError(f"{path}: unreadable training checkpoint for ModelArgs {args} ({_why(e)})") from None
    return materialise(model, state["model"])
