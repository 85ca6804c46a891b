"""Contrastive fine-tuning of a (LLaRA-adapted) model into a retriever:

    torchrun --nproc_per_node K -m llara_fast.finetune [--config FILE.toml] [--section.key VALUE ...]
    python -m llara_fast.finetune --data.beir ../shared/data/beir/scifact --model.name runs/default/checkpoints/step_0000012

Data (llara_fast.data.pairs): FlagEmbedding JSONL, a BEIR split with BM25 (or random) negatives,
or the Wikipedia sample (title -> lead paragraph). InfoNCE over one packed forward per micro-batch
(llara_fast.objectives.contrastive); full fine-tuning or LoRA (`lora.rank > 0`); the run is the
Trainer's (llara_fast.train); at the end RUN/export is an HF directory (LoRA merged).

With eval.beir DIR, retrieval is evaluated during training (llara_fast.train.evaluation):

    python -m llara_fast.finetune --data.beir DIR --eval.beir DIR --eval.split dev --eval.every 50 \
        --eval.max_docs 2000 --eval.keep_best ndcg@10 --run.report_to tensorboard
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

import torch

from llara_fast.config import opt
from llara_fast.data.loader import contrastive_loader
from llara_fast.data.pairs import FinetuneDataConfig
from llara_fast.data.shards import tokenizer_fingerprint
from llara_fast.errors import ConfigError
from llara_fast.io.export import export_trained
from llara_fast.io.hf import is_hub_id
from llara_fast.io.load import load, pin_revision
from llara_fast.lora import LoraConfig, apply_lora
from llara_fast.objectives.contrastive import ContrastiveConfig, ContrastiveModule, ContrastiveObjective
from llara_fast.templates import Template
from llara_fast.train.config import ModelConfig, OptimConfig, RunConfig, random_weights
from llara_fast.train.epochs import EpochClock
from llara_fast.train.evaluation import EvalConfig, Evaluator
from llara_fast.train.trainer import Trainer, cli


@dataclass
class FinetuneRunConfig(RunConfig):
    out_dir: str = opt("runs/finetune", "run directory: config.toml, metrics.jsonl, checkpoints/, export/")
    steps: int = opt(0, "optimizer steps (0: 20 on CPU, 500 on GPU)")


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=5, decay="linear",
                                                                   min_lr_ratio=0.0))
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    run: FinetuneRunConfig = field(default_factory=FinetuneRunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def chunked(d: FinetuneDataConfig, c: ContrastiveConfig) -> FinetuneDataConfig:
    """With GradCache and contrastive.chunk: each rank's data.queries * data.grad_accum queries of a
    step, loaded in micro-batches of `chunk` queries (the same global batch; the re-run unit)."""
    if c.chunk and not c.grad_cache:
        raise ConfigError("contrastive.chunk splits a GradCache step: set contrastive.grad_cache = true")
    if not c.grad_cache or not c.chunk or c.chunk == d.queries:
        return d
    per_rank = d.queries * d.grad_accum
    if c.chunk < 1 or per_rank % c.chunk:
        raise ConfigError(f"contrastive.chunk {c.chunk} must divide data.queries * data.grad_accum = {per_rank}")
    return dataclasses.replace(d, queries=c.chunk, grad_accum=per_rank // c.chunk)


def run(cfg: FinetuneConfig) -> dict:
    about = random_weights(cfg.model, cfg.run.seed)  # refuses a preset without weights, before any work
    trainer = Trainer(cfg, "finetune", default_steps=(20, 500))
    if about:
        trainer.log(about)
    d, m = cfg.data, cfg.model
    trainer.claim()
    torch.manual_seed(cfg.run.seed)
    m.revision = pin_revision(m.name, m.revision)  # config.toml records the Hub commit: a resume loads the same
    model, tokenizer, prompts = load(m.name, m.attn, tokenizer=m.tokenizer or None, random_init=m.random_init,
                                     layers=m.layers, seed=cfg.run.seed, revision=m.revision, notice=False)
    template = Template.from_tokenizer(tokenizer, prompts)
    source = f"{m.name} + llara_fast.finetune"
    if cfg.eval.beir:
        trainer.evaluator = Evaluator(cfg.eval, trainer, tokenizer, prompts, dataclasses.asdict(cfg.lora), source)
    loader, about = contrastive_loader(chunked(d, cfg.contrastive), tokenizer, template, trainer.rank, trainer.world)
    trainer.log(about)
    trainer.set_epochs(EpochClock(lambda _: len(loader.records), loader.slots_per_step,
                                  f"{len(loader.records):,} queries an epoch; {loader.queries} x {loader.grad_accum} x "
                                  f"{trainer.world} rank(s) per step"))
    if cfg.lora.rank > 0:
        n = apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
        trainer.log(f"LoRA rank {cfg.lora.rank} on {cfg.lora.targets}: {n:,} trainable parameters")
    objective = ContrastiveObjective(model.args.vocab_size, cfg.contrastive)
    trainer.build(model, ContrastiveModule(model, cfg.contrastive), objective)

    oom = (f"data.queries={d.queries}, data.negatives={d.negatives}: lower them or data.passage_max_len, set "
           "model.ac=selective or full, or use more GPUs")
    identity = {"tokenizer": tokenizer_fingerprint(tokenizer), "data": loader.data_id}
    summary = trainer.fit(loader, lambda: next(loader), objective.describe, identity, oom)
    if trainer.evaluator is not None and trainer.evaluator.best is not None:
        b = trainer.evaluator.best
        summary["best"] = {"path": str(trainer.out / "best"), "step": b["step"], b["metric"]: b["value"]}
        trainer.log(f"best evaluation: step {b['step']} ({b['metric']} {b['value']:.4f}), kept in "
                    f"{summary['best']['path']}")
    if cfg.run.export:
        summary["export"] = str(export_trained(trainer.module, model, tokenizer, prompts, trainer.out / "export",
                                               dataclasses.asdict(cfg.lora), source,
                                               m.revision if is_hub_id(m.name) else None))
        trainer.log(f"exported {summary['export']}")
    return summary


def main(argv: list[str] | None = None) -> int:
    return cli(argv, FinetuneConfig, run, "llara_fast.finetune", __doc__)


if __name__ == "__main__":
    sys.exit(main())
