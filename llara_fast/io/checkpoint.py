"""Training checkpoints, both directions: written and resumed by the trainer, read for their
weights by export / encode / fine-tuning.

Layout of RUN/checkpoints/step_N (torch.distributed.checkpoint):
- the DCP state {"model": the train module's state dict (keys "model.<ours>"), "optim": ...};
- rank<r>.pt: step, scheduler, data position, RNG states, "model_args" (the ModelArgs);
- COMPLETE: written last, by rank 0, once every rank is done (a directory without it is
  ignored): a JSON manifest with the step, the world size, the sha256 of every other file of the
  checkpoint and the run's identity (model args, tokenizer fingerprint, data identity), so that a
  resume verifies the bytes and the configuration before it loads anything;
- RUN/config.toml next to RUN/checkpoints names the model (and tokenizer) of the run.

Old checkpoints (a COMPLETE without hashes) still load; they are not verified.
"""
from __future__ import annotations

import errno
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
from llara_fast.io.lock import file_sha256
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


def complete_checkpoints(out: Path) -> list[Path]:
    """The checkpoints of a run that were written to the end, oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file() and not p.name.endswith(".tmp"))


def latest_checkpoint(out: Path) -> Path | None:
    done = complete_checkpoints(out)
    return done[-1] if done else None


def file_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint directory but its COMPLETE marker."""
    return {str(f.relative_to(path)): file_sha256(f)
            for f in sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name != COMPLETE)}


def manifest(path: Path) -> dict:
    return json.loads((Path(path) / COMPLETE).read_text())


def verify_checkpoint(path: Path) -> None:
    """Raise UserError naming the first file whose bytes do not match the manifest (or that is
    missing or unexpected); a checkpoint of before the manifests passes unverified."""
    want = manifest(path).get("files")
    if want is None:
        return
    got = file_hashes(path)
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            why = "missing" if name not in got else "not in its manifest" if name not in want else "changed"
            raise UserError(f"{path / name}: {why} since the checkpoint was written (sha256 mismatch)")


def latest_verified_checkpoint(out: Path, log) -> Path | None:
    """The newest complete checkpoint whose files match their hashes; each one that does not is
    named (log) and passed over."""
    for path in reversed(complete_checkpoints(out)):
        try:
            verify_checkpoint(path)
            return path
        except UserError as e:
            log(f"checkpoint {path.name} does not verify ({e}); trying the one before")
    return None


def _remove(path: Path) -> None:
    """Rename out of the step_* namespace first, then delete: a kill mid-way never leaves a
    step_N that looks complete but is not."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_partial(out: Path) -> None:
    """Remove what an interrupted save or rotation left behind (rank 0, before a run starts)."""
    root = Path(out) / "checkpoints"
    for p in list(root.glob("step_*.tmp")) + list(root.glob(".trash-*")) if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """A trainer checkpoint directory (RUN/checkpoints/step_N): a ``.metadata`` file and no config.json."""
    p = Path(path)
    return p.is_dir() and (p / ".metadata").is_file() and not (p / "config.json").is_file()


def _why(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]  # DCP nests whole tracebacks
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def save_checkpoint(out: Path, step: int, state: TrainState, keep: int, identity: dict) -> Path:
    """All ranks write into step_N.tmp; rank 0 hashes the files, writes the COMPLETE manifest and
    renames the directory once every rank is done, so a crash mid-save never leaves a directory
    that looks complete. Then keeps the ``keep`` newest complete checkpoints (0: all). A disk error
    on any rank removes the partial directory and raises one UserError naming the path.
    ``identity`` (JSON) is recorded for resume checks; its "model_args" also goes to rank<r>.pt."""
    rank = dist.get_rank()
    final = checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    error = None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as e:  # e.g. the checkpoints directory became read-only mid-run
            error = e
    dist.barrier()
    try:
        if error is not None:
            raise error
        msd, osd = get_state_dict(state.module, state.optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
        torch.save({"step": step, "scheduler": state.scheduler.state_dict(), "data": state.loader.state_dict(),
                    "rng": torch.get_rng_state(), "model_args": identity.get("model_args"),
                    "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                   tmp / f"rank{rank}.pt")
    except (OSError, CheckpointException) as e:
        error = e
    if not _device_all_ok(error is None, state):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        why = _os_error(error) if error is not None else "another rank failed to write its part"
        raise UserError(f"{tmp}: could not write the checkpoint ({why}); it was removed, the previous "
                        "checkpoints are intact") from None
    if rank == 0:
        meta = {"step": step, "world_size": dist.get_world_size(), "files": file_hashes(tmp), "identity": identity}
        (tmp / COMPLETE).write_text(json.dumps(meta))
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        done = complete_checkpoints(out)
        for old in done[:-keep] if keep > 0 else []:
            _remove(old)
    dist.barrier()
    return final


def _os_error(e: BaseException) -> str:
    """The OS error inside an exception (DCP wraps the ranks' errors), e.g. "[Errno 28] No space left"."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return f"[Errno {seen.errno}] {os.strerror(seen.errno)} ({errno.errorcode.get(seen.errno, '')})"
        seen = seen.__cause__ or seen.__context__
    return _why(e)


def _device_all_ok(ok: bool, state: TrainState) -> bool:
    """True when every rank's ``ok`` is True (one small collective on the module's device)."""
    dev = next(state.module.parameters()).device
    flag = torch.tensor([0.0 if ok else 1.0], device=dev if dev.type == "cuda" else "cpu")
    dist.all_reduce(flag)
    return float(flag) == 0.0


def check_identity(path: Path, identity: dict) -> None:
    """Refuse to resume a checkpoint of another model, tokenizer or data, naming the field."""
    saved = manifest(path).get("identity")
    if saved is None:
        return  # a checkpoint of before the manifests: nothing recorded to compare
    for key in sorted(set(saved) | set(identity)):
        a, b = saved.get(key), identity.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            if diff:
                k = diff[0]
                raise UserError(f"{path}: the checkpoint's {key}.{k} is {a.get(k)!r}, this run's is {b.get(k)!r}; "
                                "resume with the configuration it was written with, or start a new run directory")
        elif a != b:
            raise UserError(f"{path}: the checkpoint's {key} is {a!r}, this run's is {b!r}; resume with the "
                            "configuration it was written with, or start a new run directory")


def load_checkpoint(path: Path, state: TrainState) -> dict:
    """Restore a verified trainer checkpoint into ``state`` (model, optimizer, scheduler, data
    position, RNG); returns this rank's extra record (its "step" among them)."""
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
        raise UserError(f"{path}: unreadable checkpoint ({_why(e)}); it was written with another configuration "
                        "or version of llara_fast") from None
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
