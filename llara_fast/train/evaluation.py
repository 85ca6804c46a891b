"""Retrieval evaluation during training (the [eval] section of llara_fast.finetune).

Every ``eval.every`` steps and after the last, the training model's weights are gathered as
the end export gathers them (FSDP: the full parameters, LoRA merged; every rank takes part),
and rank 0 encodes the BEIR split ``eval.beir`` / ``eval.split`` with them and scores the
ranking with llara_fast.evaluate's metrics (nDCG@10, MRR@10, Recall@100; exact search), as
``python -m llara_fast.evaluate --model EXPORT`` would (bf16 on a GPU, fp32 on the CPU); the
other ranks wait for it (within the process group's timeout: eval.max_docs keeps it short).
The result is a metrics.jsonl record {"step", "eval": {metric..., "queries", "documents",
"seconds"}}, handed to the trackers like a step's. A step stopped by SIGTERM is not evaluated.

``eval.keep_best METRIC``: the export of the best evaluation so far (higher is better) is kept
in RUN/best (an HF + sentence-transformers directory like RUN/export) with RUN/best/best.json
({"metric", "value", "step", ...}); it is written beside and moved into place. A resumed run
keeps it when its step is not after the checkpoint's (later steps are re-run, and so their
evaluations) and removes it otherwise.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from llara_fast.config import opt
from llara_fast.data.beir import REASONS, load_beir
from llara_fast.encode import Encoder
from llara_fast.errors import ConfigError, UserError
from llara_fast.evaluate import DEFAULT_K, METRICS, evaluate_encoder, parse_metric
from llara_fast.io.checkpoint import materialise, meta_model
from llara_fast.io.export import ExportOptions, export, gather_trained
from llara_fast.train.trainer import _broadcast

BEST_FILE = "best.json"


@dataclass
class EvalConfig:
    beir: str = opt("", "BEIR directory evaluated during training (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); "
                    "empty: no evaluation")
    split: str = opt("dev", "the qrels split evaluated (qrels/<split>.tsv); keep test for the final report")
    every: int = opt(0, "evaluate every N steps, and after the last step (0: after the last only)")
    max_docs: int = opt(0, "cap the corpus at N documents, the evaluated queries' relevant ones included (queries "
                        "whose relevant documents do not fit are left out; 0: the full corpus)")
    max_len: int = opt(512, "text tokens kept per passage / query")
    keep_best: str = opt("", "keep the export of the best evaluation by this metric (e.g. ndcg@10) in RUN/best")


class Evaluator:
    """The evaluation the Trainer runs (Trainer.evaluator): checks and loads the data at
    construction (errors before any training), then begin(trainer, start) and evaluator(step)."""

    def __init__(self, cfg: EvalConfig, trainer, tokenizer, prompts, lora: dict, source: str):

        if cfg.every < 0:
            raise ConfigError(f"eval.every must be >= 0, got {cfg.every}")
        if cfg.max_docs < 0 or cfg.max_len < 1:
            raise ConfigError(f"eval.max_docs must be >= 0 and eval.max_len >= 1, got {cfg.max_docs}, {cfg.max_len}")
        self.metrics = METRICS
        self.keep_best = cfg.keep_best.strip().lower()
        if self.keep_best:
            try:
                parse_metric(self.keep_best)
            except UserError as e:
                raise ConfigError(f"eval.keep_best: {e}") from None
            self.metrics = tuple(dict.fromkeys(METRICS + (self.keep_best,)))
        self.k = max(DEFAULT_K, *(parse_metric(m)[1] for m in self.metrics))
        self.cfg, self.every, self.trainer = cfg, cfg.every, trainer
        self.tokenizer, self.prompts, self.lora, self.source = tokenizer, prompts, lora, source
        self.data, self.best, msg = None, None, None
        if trainer.rank == 0:
            try:
                self.data, about = self._load()
            except UserError as e:
                msg = f"eval.beir: {e}"
        msg = _broadcast(msg)
        if msg is not None:
            raise UserError(msg)
        if trainer.rank == 0:
            trainer.log(about)

    def _load(self):

        c = self.cfg
        data = load_beir(c.beir, c.split)
        full = len(data.doc_ids)
        data = data.subset(c.max_docs)
        if not data.doc_ids or not data.query_ids:
            raise UserError(f"{c.beir} ({c.split}): nothing to evaluate ({len(data.doc_ids)} documents, "
                            f"{len(data.query_ids)} queries with a relevant document)")
        corpus = (f"{len(data.doc_ids):,} documents" if len(data.doc_ids) == full else
                  f"{len(data.doc_ids):,} of {full:,} documents (eval.max_docs {c.max_docs}: the evaluated queries' "
                  "relevant ones + random)")
        when = f"every {c.every} steps and after the last" if c.every else "after the last step"
        notes = "".join(f"; {REASONS.get(k, k)}: {v}" for k, v in sorted(data.counts.items())
                        if k in ("queries_over_max_docs", "qrels_unknown_doc"))
        return data, (f"eval: {Path(c.beir).name} ({c.split}), {len(data.query_ids):,} queries, {corpus}, {when}"
                      + (f"; the best by {self.keep_best} kept in RUN/best" if self.keep_best else "") + notes)

    # ---- the best export ----------------------------------------------------------------------
    def begin(self, trainer, start: int) -> None:
        """Rank 0: the best evaluation so far (a resume keeps RUN/best up to the checkpoint's
        step); the leftovers of an interrupted swap are repaired."""
        if trainer.rank != 0:
            return
        best, new, old = trainer.out / "best", trainer.out / ".best.new", trainer.out / ".best.old"
        if not best.exists() and old.is_dir():
            os.replace(old, best)  # stopped between the two renames: the previous best is whole
        for p in (new, old):
            shutil.rmtree(p, ignore_errors=True)
        if not self.keep_best:
            return  # a resume without eval.keep_best leaves an earlier RUN/best as it is
        info = best / BEST_FILE
        rec = json.loads(info.read_text()) if info.is_file() else None
        if rec is not None and trainer.cfg.run.resume and rec["step"] <= start and rec["metric"] == self.keep_best:
            self.best = rec
            trainer.log(f"eval: the best so far is step {rec['step']} ({rec['metric']} {rec['value']:.4f}), in {best}")
        elif best.exists():
            shutil.rmtree(best)
            if rec is not None:
                trainer.log(f"eval: removed {best} (step {rec['step']} is re-run from step {start})")

    def _save_best(self, plain, step: int, value: float) -> Path:

        out = self.trainer.out
        best, new, old = out / "best", out / ".best.new", out / ".best.old"
        export(plain, self.tokenizer, new, self.prompts,
               ExportOptions(source=f"{self.source} (step {step}, best {self.keep_best})", overwrite=True))
        self.best = {"metric": self.keep_best, "value": value, "step": step, "beir": str(Path(self.cfg.beir).resolve()),
                     "split": self.cfg.split, "documents": len(self.data.doc_ids), "queries": len(self.data.query_ids)}
        (new / BEST_FILE).write_text(json.dumps(self.best, indent=1) + "\n")
        if best.exists():
            os.replace(best, old)
        os.replace(new, best)
        shutil.rmtree(old, ignore_errors=True)
        return best

    # ---- one evaluation -----------------------------------------------------------------------
    def __call__(self, step: int):
        """Every rank: gather the weights; rank 0 evaluates (and keeps the best) and returns
        (fields, log line), the others None once it is done."""

        t = self.trainer
        t0 = time.perf_counter()
        plain = gather_trained(t.module, t.model, self.lora)
        result, msg = None, None
        if t.rank == 0:
            try:
                # bf16 on GPU, fp32 on CPU (float64 in a float64 run, which is CPU-only): as plain is
                dtype = torch.bfloat16 if t.device.type == "cuda" else next(plain.parameters()).dtype
                enc_model = plain if t.device.type == "cpu" else materialise(
                    meta_model(plain.args), {k: v.to(t.device, dtype) for k, v in plain.state_dict().items()})
                enc = Encoder(enc_model, self.tokenizer, self.prompts, max_len=self.cfg.max_len, device=t.device,
                              dtype=dtype)
                ev = evaluate_encoder(enc, self.data, self.metrics, self.k)
                del enc, enc_model
                fields = {m: ev.means[m] for m in self.metrics}
                fields.update(queries=ev.n_queries, documents=len(self.data.doc_ids))
                line = " ".join(f"{m} {fields[m]:.4f}" for m in self.metrics)
                if self.keep_best:
                    value = fields[self.keep_best]
                    if math.isfinite(value) and (self.best is None or value > self.best["value"]):
                        where = self._save_best(plain, step, value)
                        line += f" | best so far: {where}"
                    elif self.best is not None:
                        line += f" | best: step {self.best['step']} ({self.best['value']:.4f})"
                fields["seconds"] = time.perf_counter() - t0
                result = (fields, line + f" | {fields['seconds']:.1f}s")
            except Exception as e:  # the other ranks are told instead of waiting for a barrier
                msg = f"the evaluation at step {step} failed on rank 0: {type(e).__name__}: {e}"
                raise
            finally:
                del plain
                if t.device.type == "cuda":
                    torch.cuda.empty_cache()
                if dist.get_world_size() > 1:
                    _broadcast(msg)
        elif _broadcast(None) is not None:
            raise UserError("the evaluation failed on rank 0 (see its error)")
        return result
