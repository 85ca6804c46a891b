"""Contrastive fine-tuning of a (LLaRA-adapted) model into a retriever:

    torchrun --nproc_per_node K -m llara_fast.finetune [--config FILE.toml] [--section.key VALUE ...]
    python -m llara_fast.finetune --data.beir ../shared/data/beir/scifact --model.name runs/default/checkpoints/step_0000012

Data (llara_fast.data.pairs): the FlagEmbedding JSONL ({"query", "pos": [...], "neg": [...]}),
a BEIR split with BM25-mined (or random) negatives, or by default the Wikipedia sample (title ->
lead paragraph). Each step: `data.queries` queries per micro-batch and rank, each with 1
positive + `data.negatives` negatives, all in one packed forward (llara_fast.objectives.
contrastive). Full fine-tuning, or LoRA with `lora.rank > 0`. The run is llara_fast.train's; at
the end RUN/export is an HF directory (LoRA merged) that `llara_fast.evaluate` reads.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

import torch

from llara_fast.config import opt
from llara_fast.data.loader import ContrastiveLoader, GroupSpec
from llara_fast.data.pairs import load_records, tokenize_records
from llara_fast.errors import ConfigError
from llara_fast.io.export import export_trained
from llara_fast.io.load import load
from llara_fast.lora import apply_lora
from llara_fast.objectives.contrastive import (
    ContrastiveConfig,
    ContrastiveModule,
    ContrastiveObjective,
)
from llara_fast.templates import Template
from llara_fast.train.config import ModelConfig, OptimConfig, RunConfig
from llara_fast.train.trainer import Trainer, cli


@dataclass
class FinetuneDataConfig:
    train: str = opt("", "FlagEmbedding JSONL ({\"query\", \"pos\", \"neg\"} per line)")
    beir: str = opt("", "or a BEIR directory, converted on the fly")
    split: str = opt("train", "BEIR split to train on")
    mining: str = opt("bm25", "BEIR negatives: bm25 (hard) or random")
    mined: int = opt(15, "BEIR negatives mined per query (data.negatives are sampled from them)")
    limit: int = opt(0, "first N records (0: all)")
    queries: int = opt(4, "queries per micro-batch and rank")
    negatives: int = opt(3, "hard negatives per query (group = 1 + negatives)")
    query_max_len: int = opt(64, "query TEXT tokens")
    passage_max_len: int = opt(256, "passage TEXT tokens")
    grad_accum: int = opt(1, "micro-batches per rank per step")
    max_bad_fraction: float = opt(0.5, "stop when more records than this are unusable")
    seed: int = opt(0, "data order and negative sampling")


@dataclass
class LoraConfig:
    rank: int = opt(0, "LoRA rank (0: full fine-tuning)")
    alpha: float = opt(32.0, "LoRA alpha (scaling alpha / rank)")
    dropout: float = opt(0.0, "dropout on the LoRA input")
    targets: str = opt("all", "comma list of wq,wk,wv,wo,w1,w2,w3 (or HF names), or all")


@dataclass
class FinetuneRunConfig(RunConfig):
    out_dir: str = opt("runs/finetune", "run directory: config.toml, metrics.jsonl, checkpoints/, export/")
    steps: int = opt(0, "optimizer steps (0: 20 on CPU, 500 on GPU)")
    export: bool = opt(True, "write RUN/export (HF directory, LoRA merged) at the end")


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=5, decay="linear",
                                                                   min_lr_ratio=0.0))
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    run: FinetuneRunConfig = field(default_factory=FinetuneRunConfig)


def run(cfg: FinetuneConfig) -> dict:
    trainer = Trainer(cfg, "finetune", default_steps=(20, 500))
    d, m, gpu = cfg.data, cfg.model, trainer.on_gpu
    if d.queries < 1 or d.negatives < 0 or d.grad_accum < 1:
        raise ConfigError("data.queries and data.grad_accum must be >= 1, data.negatives >= 0")
    trainer.write_config()
    torch.manual_seed(cfg.run.seed)
    model, tokenizer, prompts = load(m.name, m.attn, tokenizer=m.tokenizer or None, random_init=m.random_init,
                                     layers=m.layers, seed=cfg.run.seed)
    recs, counts, src = load_records(d)
    records = tokenize_records(recs, tokenizer, d.query_max_len, d.passage_max_len)
    trainer.log(f"data: {len(records)} training queries from {src}" +
                (f"; counts: {dict(sorted((k, v) for k, v in counts.items() if v))}" if counts else ""))
    loader = ContrastiveLoader(records, Template.from_tokenizer(tokenizer, prompts),
                               GroupSpec(d.queries, d.negatives, d.grad_accum, d.seed), trainer.rank, trainer.world)
    if cfg.lora.rank > 0:
        n = apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
        trainer.log(f"LoRA rank {cfg.lora.rank} on {cfg.lora.targets}: {n:,} trainable parameters")
    objective = ContrastiveObjective(model.args.vocab_size)
    trainer.build(model, ContrastiveModule(model, cfg.contrastive), objective)

    def describe(step, stats):
        r = objective.result(stats)
        rec = {"step": step, "loss": r.loss, "accuracy": r.accuracy, "grad_norm": r.grad_norm,
               "lr": trainer.scheduler.get_last_lr()[0], "queries": r.queries, "passages": r.passages,
               "tokens": r.tokens, "tokens_per_s": r.tokens / r.seconds, "queries_per_s": r.queries / r.seconds,
               "mem_gb": torch.cuda.max_memory_allocated(trainer.device) / 2**30 if gpu else None, "skipped": r.skipped}
        line = (f"step {step:5d} | loss {r.loss:.4f} | acc {r.accuracy:.3f} | gnorm {r.grad_norm:.3f} | lr "
                f"{rec['lr']:.2e} | {rec['tokens_per_s']:.0f} tok/s {rec['queries_per_s']:.2f} q/s"
                + (f" | mem {rec['mem_gb']:.1f} GB" if gpu else ""))
        return rec, line

    oom = (f"data.queries={d.queries}, data.negatives={d.negatives}: lower them or data.passage_max_len, set "
           "model.ac=selective or full, or use more GPUs")
    summary = trainer.fit(loader, lambda: next(loader), describe, oom)
    if cfg.run.export:
        summary["export"] = str(export_trained(trainer.module, model, tokenizer, prompts, trainer.out / "export",
                                               dataclasses.asdict(cfg.lora), f"{m.name} + llara_fast.finetune"))
    return summary


def main(argv: list[str] | None = None) -> int:
    return cli(argv, FinetuneConfig, run, "llara_fast.finetune", __doc__)


if __name__ == "__main__":
    sys.exit(main())
