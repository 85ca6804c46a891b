"""Contrastive fine-tuning of a (LLaRA-adapted) model into a retriever:

    torchrun --nproc_per_node K -m llara_fast.finetune [--config FILE.toml] [--section.key VALUE ...]
    python -m llara_fast.finetune --data.train pairs.jsonl
    python -m llara_fast.finetune --data.beir ../shared/data/beir/scifact --model.name runs/default/checkpoints/step_0000012

Data: the FlagEmbedding fine-tuning JSONL ({"query", "pos": [...], "neg": [...]} per line), or a
BEIR split converted on the fly with BM25-mined (or random) negatives (llara_fast.data.pairs).
With neither, it fine-tunes on the Wikipedia sample: the article title as the query, its lead
paragraph as the positive, other articles' paragraphs as negatives.

Each step takes `data.queries` queries per micro-batch and rank, each with 1 positive and
`data.negatives` negatives; queries and passages are packed into one unpadded batch and go
through one forward (llara_fast.contrastive). Full fine-tuning, or LoRA with `lora.rank > 0`.
Starts from a preset, an HF directory, a .gguf file or a training checkpoint of
llara_fast.pretrain. Checkpoints, resume, metrics and progress work as in llara_fast.pretrain;
at the end the model (LoRA merged) is exported as an HF directory RUN/export that
`llara_fast.evaluate --model RUN/export` reads.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from llara_fast.contrastive import ContrastiveConfig
from llara_fast.pretrain import ConfigError, ModelConfig, OptimConfig, RunConfig


@dataclass
class FinetuneDataConfig:
    train: str = ""                  # FlagEmbedding JSONL ({"query", "pos", "neg"} per line)
    beir: str = ""                   # or a BEIR directory, converted on the fly
    split: str = "train"             # BEIR split to train on
    mining: str = "bm25"             # BEIR negatives: bm25 (hard) or random
    mined: int = 15                  # BEIR negatives mined per query (data.negatives are sampled from them)
    limit: int = 0                   # first N records (0: all)
    queries: int = 4                 # queries per micro-batch and rank
    negatives: int = 3               # hard negatives per query (group = 1 + negatives)
    query_max_len: int = 64          # query TEXT tokens
    passage_max_len: int = 256       # passage TEXT tokens
    grad_accum: int = 1              # micro-batches per rank per step
    max_bad_fraction: float = 0.5    # stop when more records than this are unusable
    seed: int = 0


@dataclass
class LoraConfig:
    rank: int = 0                    # 0: full fine-tuning
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str = "all"             # comma list of wq,wk,wv,wo,w1,w2,w3 (or HF names), or all


@dataclass
class FinetuneRunConfig(RunConfig):
    out_dir: str = "runs/finetune"
    steps: int = 0                   # optimizer steps (0: 20 on CPU, 500 on GPU)
    export: bool = True              # write RUN/export (HF directory, LoRA merged) at the end


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=5, decay="linear",
                                                                   min_lr_ratio=0.0))
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    run: FinetuneRunConfig = field(default_factory=FinetuneRunConfig)


# ---- data ----------------------------------------------------------------------------------------
@dataclass
class ContrastiveBatch:
    batch: object                    # PackedBatch: n_queries queries, then n_queries * group passages
    special: torch.Tensor            # (n_queries * (1 + group), K) positions averaged per text
    n_queries: int
    group: int


def wiki_pairs(limit: int, negatives: int, seed: int) -> list[dict]:
    """The embedded default: title -> its lead paragraph, negatives drawn from other paragraphs."""
    from itertools import islice

    from llara_fast.data.sources import iter_wiki_sample

    items = [(t, x) for t, x in islice(iter_wiki_sample(), limit or None) if t.strip() and x.strip()]
    rng = np.random.default_rng(seed)
    out = []
    for i, (title, text) in enumerate(items):
        draw = rng.choice(len(items), min(negatives + 1, len(items)), replace=False)
        neg = [items[j][1] for j in draw if j != i][:negatives]
        out.append({"query": title, "pos": [text], "neg": neg})
    return out


class ContrastiveLoader:
    """Deterministic micro-batches of (query, positive, negatives) groups, dealt to ranks.

    The stream of query slots is the concatenation of per-epoch permutations; step s takes the
    next ``queries * world * grad_accum`` slots, and micro-batch i of rank r is slot block
    i * world + r (as PackedLoader deals), so the global step does not depend on the number of
    ranks. The positive and negatives of a slot are drawn from a generator seeded by
    (seed, slot), so resuming at a slot reproduces the run exactly."""

    def __init__(self, records: list[tuple[list[int], list[list[int]], list[list[int]]]], template, queries: int,
                 negatives: int, grad_accum: int = 1, seed: int = 0, dp_rank: int = 0, dp_world: int = 1):
        if not records:
            raise ValueError("no usable training records")
        self.records, self.template = records, template
        self.queries, self.negatives, self.grad_accum = queries, negatives, grad_accum
        self.seed, self.dp_rank, self.dp_world = seed, dp_rank, dp_world
        self.slot = 0  # next global query slot
        self._perm_epoch, self._perm = -1, None
        # Passages to draw from when a query has fewer negatives than asked: every positive.
        self.pool = [(i, j) for i, (_, pos, _) in enumerate(records) for j in range(len(pos))]

    def _record(self, slot: int) -> int:
        n = len(self.records)
        epoch = slot // n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[slot % n])

    def _group(self, slot: int) -> tuple[list[int], list[list[int]]]:
        i = self._record(slot)
        q, pos, neg = self.records[i]
        rng = np.random.default_rng([self.seed, slot, 1])
        passages = [pos[int(rng.integers(len(pos)))]]
        k = self.negatives
        if len(neg) >= k:
            passages += [neg[int(j)] for j in rng.choice(len(neg), k, replace=False)]
        else:
            passages += list(neg)
            if len(self.records) < 2:
                raise ValueError(f"a query has {len(neg)} negatives, data.negatives asks for {k}, and there is no "
                                 "other query whose positives could stand in; lower data.negatives")
            while len(passages) < 1 + k:  # top up with other queries' positives
                r, j = self.pool[int(rng.integers(len(self.pool)))]
                if r != i:
                    passages.append(self.records[r][1][j])
        return q, passages

    def micro_batch(self, first_slot: int) -> ContrastiveBatch:
        from llara_fast.data.packing import pack_encode_reference

        qs, ps = [], []
        for s in range(first_slot, first_slot + self.queries):
            q, p = self._group(s)
            qs.append(q)
            ps += p
        kinds = ["query"] * len(qs) + ["passage"] * len(ps)
        batch, special = pack_encode_reference(qs + ps, self.template, kinds, max_len=1 << 30)
        return ContrastiveBatch(batch, special, len(qs), 1 + self.negatives)

    def __next__(self) -> list[ContrastiveBatch]:
        per_block = self.queries
        out = []
        for i in range(self.grad_accum):
            block = i * self.dp_world + self.dp_rank
            out.append(self.micro_batch(self.slot + block * per_block))
        self.slot += per_block * self.dp_world * self.grad_accum
        return out

    def state_dict(self) -> dict:
        return {"slot": self.slot, "seed": self.seed, "records": len(self.records)}

    def load_state_dict(self, state: dict):
        if state["records"] != len(self.records) or state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's data ({state['records']} records, seed {state['seed']}) is not this "
                             f"run's ({len(self.records)} records, seed {self.seed})")
        self.slot = state["slot"]


def load_records(cfg: FinetuneConfig) -> tuple[list[dict], Counter, str]:
    """Training records as dicts, the skip counts, and a description of the source. Every rank
    reads (or mines) the same records deterministically."""
    counts: Counter = Counter()
    d = cfg.data
    if d.train and d.beir:
        raise ConfigError("give data.train or data.beir, not both")
    if d.train:
        from llara_fast.data.pairs import read_pairs

        pairs = read_pairs(d.train, counts, max_bad_fraction=d.max_bad_fraction)
        recs = [{"query": p.query, "pos": p.pos, "neg": p.neg} for p in pairs]
        src = d.train
    elif d.beir:
        if d.mining not in ("bm25", "random"):
            raise ConfigError(f"data.mining must be bm25 or random, got {d.mining!r}")
        from llara_fast.data.pairs import beir_to_pairs

        recs = beir_to_pairs(d.beir, d.split, negatives=d.mining, k=d.mined, seed=d.seed, counts=counts)
        src = f"{d.beir} ({d.split}, {d.mining} negatives)"
    else:
        recs = wiki_pairs(d.limit or 2000, max(d.negatives, 1), d.seed)
        src = "wiki-sample (title -> lead paragraph)"
    if d.limit:
        recs = recs[:d.limit]
    return recs, counts, src


def tokenize_records(recs: list[dict], tokenizer, q_len: int, p_len: int):
    """(query ids, [positive ids], [negative ids]) per record, cut to the max lengths; the texts
    shared between records are tokenised once."""
    texts = sorted({t for r in recs for t in r["pos"] + r["neg"]})
    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=p_len)["input_ids"] if texts else []
    ids = dict(zip(texts, enc))
    qs = tokenizer([r["query"] for r in recs], add_special_tokens=False, truncation=True,
                   max_length=q_len)["input_ids"]
    return [(q, [ids[t] for t in r["pos"]], [ids[t] for t in r["neg"]]) for q, r in zip(qs, recs)]


# ---- the run --------------------------------------------------------------------------------------
def build_model(cfg: FinetuneConfig):
    from llara_fast.export import load_source

    m = cfg.model
    return load_source(m.name, attn_backend=m.attn, tokenizer=m.tokenizer or None, random_init=m.random_init,
                       layers=m.layers, seed=cfg.run.seed)


def run(cfg: FinetuneConfig) -> dict:
    from tqdm import tqdm

    from llara_fast.contrastive import ContrastiveModule, contrastive_step
    from llara_fast.data.templates import Template
    from llara_fast.lora import apply_lora
    from llara_fast.pretrain import (NonfiniteGuard, _log, end_of_step, init_run, latest_checkpoint, record_step,
                                     setup_training, to_toml)

    rank, world, device, dtype = init_run(cfg)
    on_gpu = device.type == "cuda"
    steps = cfg.run.steps or (500 if on_gpu else 20)
    cfg.run.steps = steps
    if cfg.data.queries < 1 or cfg.data.negatives < 0 or cfg.data.grad_accum < 1:
        raise ConfigError("data.queries and data.grad_accum must be >= 1, data.negatives >= 0")
    out = Path(cfg.run.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(to_toml(cfg))

    torch.manual_seed(cfg.run.seed)
    model, tokenizer, prompts = build_model(cfg)
    template = Template.from_tokenizer(tokenizer, prompts)

    recs, counts, src = load_records(cfg)
    records = tokenize_records(recs, tokenizer, cfg.data.query_max_len, cfg.data.passage_max_len)
    _log(rank, f"data: {len(records)} training queries from {src}" +
         (f"; counts: {dict(sorted((k, v) for k, v in counts.items() if v))}" if counts else ""))
    loader = ContrastiveLoader(records, template, cfg.data.queries, cfg.data.negatives, cfg.data.grad_accum,
                               cfg.data.seed, rank, world)

    if cfg.lora.rank > 0:
        trainable = apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
        _log(rank, f"LoRA rank {cfg.lora.rank} on {cfg.lora.targets}: {trainable:,} trainable parameters")
    module, optimizer, scheduler, start = setup_training(
        cfg, model, lambda: ContrastiveModule(model, cfg.contrastive), dtype, device, steps, loader, out, rank)

    metrics_path = out / "metrics.jsonl"
    guard, last = NonfiniteGuard(cfg.run.max_nonfinite, out, rank), {}
    bar = tqdm(total=steps, initial=start, desc="finetune", unit="step", disable=rank != 0, file=sys.stderr)
    wall0 = time.perf_counter()
    try:
        for step in range(start + 1, steps + 1):
            r = contrastive_step(module, next(loader), optimizer, scheduler, device=device,
                                 grad_clip=cfg.optim.grad_clip)
            guard.update(step, r.skipped, r.loss, r.grad_norm)
            rec = {"step": step, "loss": r.loss, "accuracy": r.accuracy, "grad_norm": r.grad_norm,
                   "lr": scheduler.get_last_lr()[0], "queries": r.queries, "passages": r.passages,
                   "tokens": r.tokens, "tokens_per_s": r.tokens / r.seconds,
                   "queries_per_s": r.queries / r.seconds,
                   "mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
                   "skipped": r.skipped}
            last = rec
            record_step(rank, metrics_path, rec, step % cfg.run.log_every == 0 or step == steps,
                        f"step {step:5d} | loss {r.loss:.4f} | acc {r.accuracy:.3f} | gnorm {r.grad_norm:.3f} "
                        f"| lr {rec['lr']:.2e} | {rec['tokens_per_s']:.0f} tok/s {rec['queries_per_s']:.2f} q/s"
                        + (f" | mem {rec['mem_gb']:.1f} GB" if on_gpu else ""))
            bar.update(1)
            end_of_step(cfg, step, steps, out, module, optimizer, scheduler, loader, rank, model.args)
    except torch.cuda.OutOfMemoryError as e:
        raise SystemExit(f"out of GPU memory with data.queries={cfg.data.queries}, data.negatives="
                         f"{cfg.data.negatives} ({e}). Lower them or data.passage_max_len, set model.ac=selective "
                         "or full, or use more GPUs") from None
    finally:
        bar.close()
    summary = {"steps": steps, "wall_s": time.perf_counter() - wall0, "final": last,
               "checkpoint": str(latest_checkpoint(out)), "world_size": world}
    if cfg.run.export:
        summary["export"] = str(export_run(module, model, tokenizer, prompts, out, cfg, rank))
    _log(rank, json.dumps(summary))
    return summary


def export_run(module, model, tokenizer, prompts, out: Path, cfg: FinetuneConfig, rank: int) -> Path:
    """RUN/export: an HF directory of the fine-tuned weights (LoRA merged), from the full state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from llara_fast.export import export, materialise, meta_model

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    dst = out / "export"
    if rank == 0:
        plain = meta_model(dataclasses.replace(model.args), dataclasses.asdict(cfg.lora))
        materialise(plain, {k: v.float() for k, v in full.items()})
        export(plain, tokenizer, dst, prompts=prompts, source=f"{cfg.model.name} + llara_fast.finetune",
               overwrite=True)
    dist.barrier()
    return dst


def main(argv: list[str] | None = None) -> int:
    from llara_fast.pretrain import cli

    return cli(argv, FinetuneConfig, run, "llara_fast.finetune", __doc__)


if __name__ == "__main__":
    sys.exit(main())
