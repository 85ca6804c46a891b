#!/usr/bin/env bash
# Issue #5's GPU point: `llara_fast.pretrain` as users run it, on a GPU machine that has neither
# the project's venv nor the asset packages (the lent device: torch + triton + transformers only,
# and at most 64 MiB carried). Two runs, each reported as tokens/s, passages/s, TFLOP/s and MFU:
#   default  the embedded default as it runs on a GPU (SmolLM2-135M, wiki sample, 200 steps,
#            16,384-token micro-batches), with the preset's shape at random init: the 98 MB weights
#            package does not fit the carry, and throughput does not depend on the values;
#   larger   llama2-7b cut to 8 blocks (~2.0 B parameters), LLaMA SentencePiece tokenizer.
#
#   benchmarks/pretrain_gpu.sh stage   # here, with the venv: writes .bench_assets/ (11 MB, ignored)
#   benchmarks/pretrain_gpu.sh run     # there, carrying .bench_assets: runs both, results in $OUT
#   benchmarks/pretrain_gpu.sh attn    # there: the GPU attention tests, then throughput.py (ours)
#                                      # with torch_varlen vs the opt-in flex backend, llama2-7b L8
#
# device call:  run(command="bash benchmarks/pretrain_gpu.sh run", carry=[".bench_assets"])
# Sizes from the environment: DEFAULT_STEPS (200) LARGER_STEPS (60) LARGER_LAYERS (8) SKIP (10),
# and SMOKE=1 for a seconds-long CPU check of the script itself (1 block, 3 steps, 64 records).
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=.bench_assets
PY=${PYTHON:-python3}

stage() {
  mkdir -p "$ASSETS"
  "$PY" - "$ASSETS" <<'EOF'
import shutil, sys
from pathlib import Path
from llara_fast.data.sources import iter_wiki_sample, sentencepiece_model_path, wiki_sample_path
from llara_fast.io.hf import load_tokenizer, resolve_source

out = Path(sys.argv[1])
tok = load_tokenizer(resolve_source("smollm2-135m"))
tok.save_pretrained(out / "smollm2-tokenizer")  # without <s1>..<s16>, as the GGUF ships it
saved = load_tokenizer(out / "smollm2-tokenizer")
texts = [text for _, (_, text) in zip(range(300), iter_wiki_sample())]  # the first 300 lead paragraphs
assert len(saved) == len(tok) and saved(texts)["input_ids"] == tok(texts)["input_ids"], "saved tokenizer differs"
shutil.copy(sentencepiece_model_path(), out / "tokenizer.model.v1")
shutil.copy(wiki_sample_path(), out / "summaries_en-us.json")
print(f"staged {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
EOF
  # the public fused-loss libraries gpu_suite.py times beside ours (pure Python + Triton, ~1 MB)
  "$PY" -m pip download -q --no-deps liger-kernel cut-cross-entropy -d "$ASSETS/wheels" \
    || echo "could not download the Liger / cut-cross-entropy wheels: gpu_suite.py times ours alone" >&2
}

run() {
  [ -d "$ASSETS/smollm2-tokenizer" ] || { echo "no $ASSETS: run '$0 stage' here and carry it" >&2; exit 2; }
  local out=${OUT:-/tmp/pretrain_gpu_out} runs=${RUNS_DIR:-/tmp/pretrain_gpu_runs}
  mkdir -p "$out" "$runs"
  export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LLARA_FAST_WIKI_SAMPLE="$ASSETS/summaries_en-us.json"
  "$PY" setup.py -q build_ext --inplace >"$out/build.log" 2>&1 \
    || echo "C++ packer did not build (see build.log): the Python packer feeds the runs"
  local smoke=()
  [ "${SMOKE:-0}" = 1 ] && smoke=(--model.layers 1 --run.steps 3 --data.limit 64)
  local t0=$SECONDS
  "$PY" -m llara_fast.pretrain --model.random_init true --model.tokenizer "$ASSETS/smollm2-tokenizer" \
    --run.steps "${DEFAULT_STEPS:-200}" --run.out_dir "$runs/default" --run.export false "${smoke[@]}" 2>&1 \
    | tr '\r' '\n' | grep -v '^pretrain: *[0-9]*%' | tee "$out/default.log"
  echo "default: $((SECONDS - t0)) s wall (set-up, data preparation and checkpoint included)" | tee -a "$out/default.log"
  t0=$SECONDS
  "$PY" -m llara_fast.pretrain --model.name llama2-7b --model.random_init true --model.layers "${LARGER_LAYERS:-8}" \
    --model.tokenizer "$ASSETS/tokenizer.model.v1" --run.steps "${LARGER_STEPS:-60}" \
    --run.out_dir "$runs/larger" --run.export false "${smoke[@]}" 2>&1 | tr '\r' '\n' | grep -v '^pretrain: *[0-9]*%' \
    | tee "$out/larger.log"
  echo "larger: $((SECONDS - t0)) s wall (set-up, data preparation and checkpoint included)" | tee -a "$out/larger.log"
  local skip=${SKIP:-10}; [ "${SMOKE:-0}" = 1 ] && skip=1
  cp "$runs/default/metrics.jsonl" "$out/default-metrics.jsonl"
  cp "$runs/larger/metrics.jsonl" "$out/larger-metrics.jsonl"
  "$PY" -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
            '| torch', torch.__version__)" | tee "$out/summary.md"
  "$PY" benchmarks/summarize_run.py "$runs/default" "$runs/larger" --skip "$skip" | tee -a "$out/summary.md"
}

attn() {
  [ -d "$ASSETS/smollm2-tokenizer" ] || { echo "no $ASSETS: run '$0 stage' here and carry it" >&2; exit 2; }
  local out=${OUT:-/tmp/pretrain_gpu_out}
  mkdir -p "$out"
  export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LLARA_FAST_WIKI_SAMPLE="$ASSETS/summaries_en-us.json"
  "$PY" -m pytest -q tests/test_attention.py 2>&1 | tail -5 | tee "$out/attn-tests.log"
  local common=(--model llama2-7b --layers "${LARGER_LAYERS:-8}" --tokenizer "$ASSETS/tokenizer.model.v1" --impl ours)
  [ "${SMOKE:-0}" = 1 ] && common=(--model debug --impl ours --steps 1 --warmup 0 --device cpu)
  for data in "" --synthetic; do
    for backend in torch_varlen flex; do
      echo "== attn $backend ${data:-wiki}" | tee -a "$out/attn.log"
      "$PY" benchmarks/throughput.py "${common[@]}" --attn "$backend" $data 2>&1 | grep -v '^{' \
        | tee -a "$out/attn.log" || echo "(failed)" | tee -a "$out/attn.log"
    done
  done
}

case "${1:-}" in
  stage) stage ;;
  run) run ;;
  attn) attn ;;
  *) echo "usage: $0 stage|run|attn" >&2; exit 2 ;;
esac
