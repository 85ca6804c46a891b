"""The GPU suite of issue #15: everything one lent H100/H200 should measure, in ONE run of at most
~9 minutes, each part's result written to --out as soon as it ends; a failing part does not stop
the next.

    benchmarks/pretrain_gpu.sh stage                 # here, with the venv: .bench_assets/ (11 MB)
    python benchmarks/gpu_suite.py --out "$OUT"      # there (device call, carry .bench_assets)
    SMOKE=1 python benchmarks/gpu_suite.py --out /tmp/suite   # here: every part at toy sizes, CPU

    device: run(command='python benchmarks/gpu_suite.py --out "$OUT"', carry=[".bench_assets"], timeout_s=590)

Parts, in this order, the acceptance figures first (--budget-s caps the whole; a part that would
start with less than its minimum left is skipped and says so; --parts reruns those in a second call):
  a. tests       the kernel and attention tests (bf16 on the GPU);
  b. released_both, wiki_both  throughput.py, llama2-7b at 8 blocks, 32 passages per step, the
                 released data's shape (--synthetic) and the wiki sample: ours with the training
                 defaults (on CUDA: compiled blocks) vs the reference; with a profile of one step of
                 ours grouped by kind (throughput.py --profile, profile_breakdown.py);
  c. pretrain_*  `python -m llara_fast.pretrain`: the embedded default (SmolLM2 shape) and llama2-7b
                 at 8 blocks on the prepared wiki sample; then throughput.py --data-dir on the same
                 directory, token budget and passages per step (the trainer's tokens/s against the
                 benchmark's); full 32-block llama2-7b with activation checkpointing where the GPU
                 has >= 120 GB;
  d. levers      ours with each lever switched away from the defaults: --compile off (profiled too),
                 --attn triton (ours: kernels/branch_attention.py), --lm-chunk-rows 256 (the old
                 32 MiB chunks), --no-reshard (FSDP2 keeps gathered blocks to backward), --attn flex;
                 attn_*: bench_branch_attention.py, one attention call, forward and forward+backward,
                 every backend (triton, torch_varlen, flex, sdpa), llama2-7b heads, released and wiki
                 lengths;
  e. kernels     bench_linear_xent.py at the llama2-7b and SmolLM2 head shapes, ours beside
                 Liger-Kernel's and cut-cross-entropy's fused linear CE (wheels staged in
                 .bench_assets/wheels by pretrain_gpu.sh stage, installed --no-deps there);
                 bench_block_ops.py: RMSNorm, RoPE, SwiGLU's gate at llama2-7b's shape, eager,
                 compiled and Liger-Kernel's (is a fused kernel of our own worth writing?);
  f. summary     summary.md and gpu-suite-DATE-DEVICE.json (device, released_ratio, released_mfu,
                 wiki_ratio, peak_mem_ratio, pretrain_tokens_per_s, throughput_tokens_per_s, ...:
                 every number measured in this run, null where its part did not finish).
Copy summary.md and the JSON into benchmarks/results/ afterwards.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from summarize_run import rates as pretrain_rates  # noqa: E402

ASSETS = ROOT / ".bench_assets"
BUDGET = 16384  # pretrain's token budget per micro-batch on a GPU


class Suite:
    def __init__(self, out: Path, runs: Path, budget_s: float, smoke: bool, only: set[str] | None = None):
        self.out, self.runs, self.smoke, self.only = out, runs, smoke, only
        self.deadline = time.monotonic() + budget_s
        self.results: dict[str, dict] = {}
        out.mkdir(parents=True, exist_ok=True)
        runs.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def part(self, name: str, argv: list[str], min_s: float, max_s: float, env: dict | None = None) -> dict:
        """Run one part (a subprocess, os.environ + env) into OUT/<name>.log; returns and records its status."""
        if self.only is not None and name not in self.only:
            r = {"status": "skipped", "reason": "not in --parts"}
            self.results[name] = r
            return r
        if self.left() < min_s:
            r = {"status": "skipped", "reason": f"{self.left():.0f} s left, needs >= {min_s:.0f} s"}
            print(f"[suite] {name}: skipped ({r['reason']})", flush=True)
            self.results[name] = r
            self._save()
            return r
        t0 = time.monotonic()
        log = self.out / f"{name}.log"
        timeout = max(1.0, min(max_s, self.left()))
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **(env or {}))
        with open(log, "w") as f:
            f.write("$ " + " ".join(argv) + "\n")
            f.flush()
            try:
                rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                    timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        r = {"status": "ok" if rc == 0 else "failed", "rc": rc, "seconds": round(time.monotonic() - t0, 1),
             "command": " ".join(argv)}
        text = log.read_text(errors="replace")
        last_json = next((ln for ln in reversed(text.splitlines()) if ln.startswith("{")), None)
        if last_json:
            try:
                r["json"] = json.loads(last_json)
            except json.JSONDecodeError:
                pass
        print(f"[suite] {name}: {r['status']} in {r['seconds']} s ({self.left():.0f} s left)", flush=True)
        self.results[name] = r
        self._save()
        return r

    def _save(self) -> None:
        (self.out / "parts.json").write_text(json.dumps(self.results, indent=1, default=str))


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def throughput_args(s: Suite, *extra: str) -> list[str]:
    if s.smoke:
        return _py("benchmarks/throughput.py", "--model", "debug", "--device", "cpu", "--steps", "1", "--warmup", "0",
                   "--passages-per-step", "4", "--max-len", "64", *extra)
    return _py("benchmarks/throughput.py", "--model", "llama2-7b", "--layers", "8",
               "--tokenizer", str(ASSETS / "tokenizer.model.v1"), "--steps", "10", "--warmup", "3", *extra)


def pretrain_args(s: Suite, name: str, *extra: str) -> list[str]:
    smoke = ["--model.layers", "1", "--run.steps", "3", "--run.device", "cpu", "--data.limit", "64"] if s.smoke else []
    return _py("-m", "llara_fast.pretrain", "--run.out_dir", str(s.runs / name), "--run.overwrite", "true",
               "--run.export", "false", *extra, *smoke)  # timing runs: no export of the (up to 7B) weights


def gpu_memory_gb() -> float:
    try:
        import torch
        return torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available() else 0.0
    except Exception:  # noqa: BLE001 - the suite must go on
        return 0.0


def run_suite(s: Suite) -> None:
    """The acceptance figures first (tests, ours vs the reference, the trainer on the GPU), then
    the levers and the kernel benchmarks, so that a tight budget skips the latter."""
    s.part("build", _py("setup.py", "-q", "build_ext", "--inplace"), 10, 90)
    tests = ["tests/kernels", "tests/unit/test_attention.py", "--ignore", "tests/kernels/test_compile_sm90.py"]
    s.part("tests", _py("-m", "pytest", "-q", "-p", "no:cacheprovider",
                        *(["tests/kernels/test_linear_xent.py", "-k", "default_chunk"] if s.smoke else tests)), 20, 100)
    # the training defaults (on CUDA: compiled blocks) against the reference
    s.part("released_both", throughput_args(s, "--impl", "both", *RELEASED, "--profile",
                                            str(s.out / "profile-default.json")), 40, 120)
    s.part("wiki_both", throughput_args(s, "--impl", "both"), 40, 100)
    run_pretrain(s)
    run_levers(s)
    run_kernel_benches(s)
    s._save()


RELEASED = ["--synthetic"]  # throughput.py's stand-in for the released data's shape


def run_pretrain(s: Suite) -> None:
    """The trainer itself: the embedded default, llama2-7b at 8 blocks on the wiki sample against
    throughput.py on the same data, the full 7B where the memory allows."""
    smoke = s.smoke
    tok_smol = [] if smoke else ["--model.random_init", "true", "--model.tokenizer", str(ASSETS / "smollm2-tokenizer")]
    r = s.part("pretrain_default", pretrain_args(s, "default", *tok_smol, *([] if smoke else ["--run.steps", "60"])),
               40, 100)
    if r["status"] == "ok":
        r["rates"] = pretrain_rates(s.runs / "default", 1 if smoke else 10)
    wiki_dir = s.runs / "wiki-llama"
    tok_llama = [] if smoke else ["--tokenizer", str(ASSETS / "tokenizer.model.v1")]
    s.part("prepare_wiki", _py("-m", "llara_fast.data.prepare", "--format", "wiki-sample", "--max-len", "128",
                               "--out", str(wiki_dir), "--overwrite", "--no-progress",
                               *(["--tokenizer", "smollm2-135m", "--limit", "200"] if smoke else tok_llama)), 10, 60)
    model = ["--model.name", "debug"] if smoke else ["--model.name", "llama2-7b", "--model.layers", "8",
                                                     "--model.tokenizer", str(ASSETS / "tokenizer.model.v1")]
    budget = "1024" if smoke else str(BUDGET)
    r = s.part("pretrain_l8", pretrain_args(s, "l8", *model, "--model.random_init", "true", "--data.dir", str(wiki_dir),
                                            "--data.token_budget", budget,
                                            *([] if smoke else ["--run.steps", "30"])), 60, 120)
    if r["status"] == "ok":
        rates = pretrain_rates(s.runs / "l8", 1 if smoke else 5)
        r["rates"] = rates
        p = str(int(rates["passages_per_step"] or 32))
        extra = ["--data-dir", str(wiki_dir), "--token-budget", budget, "--passages-per-step", p, "--impl", "ours",
                 *(["--layers", "1"] if smoke else [])]  # the pretrain parts' one block in SMOKE
        s.part("throughput_l8_data", throughput_args(s, *extra), 40, 90)
    mem_gb = gpu_memory_gb()
    if smoke or mem_gb >= 120:
        full = ["--model.name", "debug"] if smoke else ["--model.name", "llama2-7b", "--model.ac", "full",
                                                        "--model.tokenizer", str(ASSETS / "tokenizer.model.v1")]
        r = s.part("pretrain_7b_full", pretrain_args(s, "full", *full, "--model.random_init", "true", "--data.dir",
                                                     str(wiki_dir), "--data.token_budget",
                                                     budget, *([] if smoke else ["--run.steps", "8"])), 90, 200)
        if r["status"] == "ok":
            r["rates"] = pretrain_rates(s.runs / "full", 1 if smoke else 2)
    else:
        s.results["pretrain_7b_full"] = {"status": "skipped", "reason": f"GPU memory {mem_gb:.0f} GB < 120 GB"}
    s._save()


def run_levers(s: Suite) -> None:
    """Ours with each lever switched away from the defaults, and the attention backends alone."""
    smoke = s.smoke
    s.part("released_eager", throughput_args(s, "--impl", "ours", *RELEASED, "--compile", "off",
                                             "--profile", str(s.out / "profile-eager.json")), 40, 120)
    interp = {"TRITON_INTERPRET": "1"} if smoke else None  # the Triton kernels run interpreted on a CPU
    s.part("released_triton", throughput_args(s, "--impl", "ours", *RELEASED, "--attn", "triton"), 30, 90, interp)
    # the attention call alone, every backend: llama2-7b heads, the released shape and wiki-like lengths
    attn_shape = ["--examples", "2", "--text-len", "24", "--text-len-min", "5", "--heads", "4", "--kv-heads", "2",
                  "--head-dim", "16", "--iters", "1", "--warmup", "0", "--no-memory"] if smoke else []
    s.part("attn_released", _py("benchmarks/bench_branch_attention.py", *attn_shape), 20, 120, interp)  # flex compiles
    s.part("released_chunk256", throughput_args(s, "--impl", "ours", *RELEASED, "--lm-chunk-rows", "256"), 30, 70)
    s.part("released_noreshard", throughput_args(s, "--impl", "ours", *RELEASED, "--no-reshard"), 30, 70)
    s.part("released_flex", throughput_args(s, "--impl", "ours", *RELEASED, "--attn", "sdpa" if smoke else "flex"),
           30, 90)
    s.part("wiki_eager", throughput_args(s, "--impl", "ours", "--compile", "off"), 30, 100)
    s.part("attn_wiki", _py("benchmarks/bench_branch_attention.py", *(attn_shape or
                                                                      ["--text-len", "200", "--text-len-min", "40"])),
           20, 120, interp)


def run_kernel_benches(s: Suite) -> None:
    """Ours beside Liger-Kernel and cut-cross-entropy (wheels staged in .bench_assets/wheels)."""
    smoke = s.smoke
    libs = s.runs / "libs"
    wheels = sorted(str(w) for w in (ASSETS / "wheels").glob("*.whl"))
    if wheels and not smoke:
        s.part("libs_install", _py("-m", "pip", "install", "-q", "--no-deps", "--target", str(libs), *wheels), 5, 60)
        os.environ["PYTHONPATH"] = os.pathsep.join([str(libs), os.environ.get("PYTHONPATH", "")])
    for name, shape in (("linear_xent_llama", ["--vocab", "32016", "--dim", "4096", "--tokens", "16384"]),
                        ("linear_xent_smollm2", ["--vocab", "49168", "--dim", "576", "--tokens", "16384"])):
        shape = ["--vocab", "512", "--dim", "32", "--tokens", "64", "--device", "cpu", "--no-memory"] if smoke else shape
        s.part(name, _py("benchmarks/bench_linear_xent.py", *shape, "--libs", "auto"), 20, 60)
    # RMSNorm / RoPE / SwiGLU: eager, compiled, Liger's; whether fused kernels of our own would pay
    ops_shape = ["--tokens", "256", "--dim", "64", "--ffn", "128", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                 "--iters", "1", "--no-memory", "--impls", "eager,compile"] if smoke else []
    s.part("block_ops", _py("benchmarks/bench_block_ops.py", *ops_shape), 30, 90)


# ---- summary -----------------------------------------------------------------------------------
def _res(s: Suite, part: str, impl: str = "ours") -> dict | None:
    j = s.results.get(part, {}).get("json")
    return (j or {}).get("results", {}).get(impl)


def summarize(s: Suite) -> dict:
    get = lambda part, impl, key: (_res(s, part, impl) or {}).get(key)  # noqa: E731
    ratio = lambda part, key: (get(part, "ours", key) / get(part, "reference", key)  # noqa: E731
                               if get(part, "ours", key) and get(part, "reference", key) else None)
    pre = s.results.get("pretrain_l8", {}).get("rates", {})
    meta = (s.results.get("released_both", {}).get("json") or {})
    out = {
        "device": meta.get("device"), "versions": meta.get("versions"), "date": dt.date.today().isoformat(),
        "smoke": s.smoke,
        "released_ratio": ratio("released_both", "passages_per_s"),
        "released_mfu": get("released_both", "ours", "mfu_ours"),
        "released_mfu_titan": get("released_both", "ours", "mfu_titan"),
        "released_mfu_reference": get("released_both", "reference", "mfu_ours"),
        "wiki_ratio": ratio("wiki_both", "passages_per_s"),
        "peak_mem_ratio": ratio("released_both", "peak_mib"),
        "peak_mem_ratio_wiki": ratio("wiki_both", "peak_mib"),
        "loss_step1": {impl: (get("released_both", impl, "first_loss") or [None])[0] for impl in ("ours", "reference")},
        "levers_released_passages_per_s": {
            "default": get("released_both", "ours", "passages_per_s"),
            "eager": get("released_eager", "ours", "passages_per_s"),
            "lm_chunk_rows_256": get("released_chunk256", "ours", "passages_per_s"),
            "no_reshard": get("released_noreshard", "ours", "passages_per_s"),
            "attn_flex": get("released_flex", "ours", "passages_per_s"),
            "attn_triton": get("released_triton", "ours", "passages_per_s")},
        "attention": {name: _bench_cases(s, name) for name in ("attn_released", "attn_wiki")},
        "levers_wiki_passages_per_s": {"default": get("wiki_both", "ours", "passages_per_s"),
                                       "eager": get("wiki_eager", "ours", "passages_per_s")},
        "fast_path": meta.get("fast_path_ours"),
        "linear_xent": {name: (s.results.get(name, {}).get("json") or {}) for name in
                        ("linear_xent_llama", "linear_xent_smollm2")},
        "block_ops": _bench_cases(s, "block_ops"),
        "pretrain_tokens_per_s": pre.get("tokens_per_s"),
        "throughput_tokens_per_s": get("throughput_l8_data", "ours", "tokens_per_s"),
        "pretrain_default": s.results.get("pretrain_default", {}).get("rates"),
        "pretrain_7b_full": s.results.get("pretrain_7b_full", {}).get("rates"),
        "parts": {k: {kk: v.get(kk) for kk in ("status", "seconds", "reason", "command") if v.get(kk) is not None}
                  for k, v in s.results.items()},
    }
    if out["pretrain_tokens_per_s"] and out["throughput_tokens_per_s"]:
        out["pretrain_vs_throughput"] = out["pretrain_tokens_per_s"] / out["throughput_tokens_per_s"]
    for name in ("profile-default", "profile-eager"):
        p = s.out / f"{name}.json"
        if p.exists():
            out[name.replace("-", "_")] = json.loads(p.read_text())
    tests_log = s.out / "tests.log"
    if tests_log.exists():
        m = re.findall(r"(\d+) (passed|failed|skipped|error)", tests_log.read_text())
        out["tests"] = {k: int(n) for n, k in m}
    return out


def _bench_cases(s: Suite, part: str) -> dict:
    """{impl:pass: median ms} of a kernel-benchmark part (bench_branch_attention, bench_block_ops)."""
    j = s.results.get(part, {}).get("json") or {}
    return {c["name"]: round(c["ms"], 3) for c in j.get("cases", [])}


def summary_md(r: dict) -> str:
    f = lambda x, spec=".2f": "-" if x is None else format(x, spec)  # noqa: E731
    lines = [f"# GPU suite, {r['date']}, {r['device']}", "", f"versions: {r['versions']}", "",
             "| figure | value | goal |", "|---|---:|---|",
             f"| released shape: ours / reference passages/s | {f(r['released_ratio'])}x | >= 1.5x |",
             f"| released shape: MFU ours (titan) | {f(r['released_mfu'], '.1%')} ({f(r['released_mfu_titan'], '.1%')}) "
             f"| >= 50% |",
             f"| wiki sample: ours / reference passages/s | {f(r['wiki_ratio'])}x | >= 3x |",
             f"| peak memory ours / reference (released; wiki) | {f(r['peak_mem_ratio'])}; {f(r['peak_mem_ratio_wiki'])} "
             f"| <= 1 |",
             f"| loss at step 1, ours; reference | {f(r['loss_step1']['ours'], '.4f')}; "
             f"{f(r['loss_step1']['reference'], '.4f')} | equal within bf16 |",
             f"| pretrain L8 tokens/s; throughput.py same data | {f(r['pretrain_tokens_per_s'], '.0f')}; "
             f"{f(r['throughput_tokens_per_s'], '.0f')} | within 5% |", "",
             f"Defaults picked (ours): {r.get('fast_path')}", "",
             "Levers, ours, released shape, passages/s: " + ", ".join(
                 f"{k} {f(v)}" for k, v in r["levers_released_passages_per_s"].items()),
             "Levers, ours, wiki sample, passages/s: " + ", ".join(
                 f"{k} {f(v)}" for k, v in r["levers_wiki_passages_per_s"].items()), ""]
    for name, cases in {**r["attention"], "block_ops": r.get("block_ops") or {}}.items():
        lines.append(f"{name}, one call, median ms: " + (", ".join(f"{k} {v}" for k, v in cases.items())
                                                                  or "-"))
    for name in ("profile_default", "profile_eager"):
        p = r.get(name)
        if p:
            lines.append(f"{name}: wall {p['wall_ms']:.1f} ms; " + ", ".join(
                f"{k} {v:.1f}" for k, v in p["groups_ms"].items()) + (f", idle {p['idle_ms']:.1f}" if p["idle_ms"]
                                                                       is not None else "") + " (ms)")
    lines += ["", "| part | status | seconds | command |", "|---|---|---:|---|"]
    for k, v in r["parts"].items():
        lines.append(f"| {k} | {v.get('status')} {v.get('reason', '')} | {v.get('seconds', '-')} | "
                     f"`{v.get('command', '')}` |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_suite_out")))
    p.add_argument("--runs", type=Path, default=Path("/tmp/gpu_suite_runs"), help="run directories (not copied back)")
    p.add_argument("--budget-s", type=float, default=540, help="the whole suite's time")
    p.add_argument("--parts", default="", help="comma list of parts to run (default: all), e.g. for a second call")
    p.add_argument("--smoke", action="store_true", default=os.environ.get("SMOKE") == "1",
                   help="toy sizes on the CPU: checks the suite itself (also SMOKE=1)")
    a = p.parse_args(argv)
    if not a.smoke and not (ASSETS / "tokenizer.model.v1").exists():
        sys.exit(f"no {ASSETS}: run 'benchmarks/pretrain_gpu.sh stage' here and carry it")
    if not a.smoke:
        os.environ.setdefault("LLARA_FAST_WIKI_SAMPLE", str(ASSETS / "summaries_en-us.json"))
    s = Suite(a.out, a.runs, a.budget_s, a.smoke, {x for x in a.parts.split(",") if x} or None)
    try:
        run_suite(s)
    finally:
        r = summarize(s)
        dev = re.sub(r"[^a-z0-9]+", "-", (r["device"] or "unknown").lower()).strip("-")[:40]
        (a.out / f"gpu-suite-{r['date']}-{dev}.json").write_text(json.dumps(r, indent=1, default=str))
        (a.out / "summary.md").write_text(summary_md(r))
        print(summary_md(r))
        if a.runs.exists() and a.smoke:
            shutil.rmtree(a.runs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
