"""Run a training entry point with test hooks on llara_fast.train.trainer.Trainer, as users run
it (python -m / torchrun), with no test code in the product:

    python tests/hooked_run.py [--crash-at N] [--hash-dir DIR] -- llara_fast.pretrain ARGS...

--crash-at N: SIGKILL this process right after step N (and its checkpoint, if one is due).
--hash-dir DIR: after each step, rank r appends to DIR/rank{r}.jsonl a fingerprint of its
micro-batches: sum of (input id sum x (global micro-batch index + 1)); summed over ranks it is the
same for any split of the global batch (micro-batch i of rank r is global micro-batch i * world + r).
"""
import argparse
import json
import os
import runpy
import signal
import sys
from pathlib import Path

from llara_fast.train.trainer import Trainer


def crash_at(n: int):
    def hook(trainer, step, batches, stats):
        if step == n:
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def hash_into(directory: Path):
    def hook(trainer, step, batches, stats):
        h = 0
        for i, b in enumerate(batches):
            ids = getattr(b, "batch", b).input_ids  # a PackedBatch, or a ContrastiveBatch holding one
            h += int(ids.sum()) * (i * trainer.world + trainer.rank + 1)
        with open(directory / f"rank{trainer.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "hash": h}) + "\n")
    return hook


def main():
    argv = sys.argv[1:]
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--crash-at", type=int)
    p.add_argument("--hash-dir", type=Path)
    a = p.parse_args(argv[:split])
    module, args = argv[split + 1], argv[split + 2:]
    if a.crash_at:
        Trainer.hooks.append(crash_at(a.crash_at))
    if a.hash_dir:
        a.hash_dir.mkdir(parents=True, exist_ok=True)
        Trainer.hooks.append(hash_into(a.hash_dir))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
