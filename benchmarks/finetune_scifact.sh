#!/usr/bin/env bash
# The project's small-scale replication of LLaRA's claim on BEIR SciFact (issue #8):
# fine-tune (a) the base SmolLM2-135M and (b) the LLaRA-adapted one (a pretrain checkpoint) with
# identical settings on the train split (BM25 hard negatives), then evaluate base, adapted,
# base+FT and adapted+FT on the test split with identical settings.
#
#   benchmarks/finetune_scifact.sh ADAPTED_CHECKPOINT OUT_DIR [extra finetune overrides...]
#
# Sizes come from the environment so the same script runs small on a CPU and bigger on a GPU:
#   FT_STEPS (20) FT_QUERIES (4) FT_NEGATIVES (3) FT_LR (3e-5) FT_PASSAGE_LEN (128)
#   EVAL_MAX_DOCS (0: full corpus) EVAL_MAX_LEN (512)
set -euo pipefail
ADAPTED=${1:?usage: $0 ADAPTED_CHECKPOINT OUT_DIR [overrides]}
OUT=${2:?usage: $0 ADAPTED_CHECKPOINT OUT_DIR [overrides]}
shift 2
PY=${PYTHON:-python}
BEIR=${BEIR:-../shared/data/beir/scifact}
mkdir -p "$OUT"
FT=(--data.beir "$BEIR" --data.split train --data.mining bm25
    --data.queries "${FT_QUERIES:-4}" --data.negatives "${FT_NEGATIVES:-3}"
    --data.passage_max_len "${FT_PASSAGE_LEN:-128}" --run.steps "${FT_STEPS:-20}"
    --optim.lr "${FT_LR:-3e-5}" --optim.warmup_steps 2 "$@")
EV=(--beir "$BEIR" --split test --max-docs "${EVAL_MAX_DOCS:-0}" --max-len "${EVAL_MAX_LEN:-512}" --quiet)

for name in base adapted; do
  src=smollm2-135m; [ "$name" = adapted ] && src=$ADAPTED
  if [ ! -f "$OUT/ft-$name/export/config.json" ]; then
    "$PY" -m llara_fast.finetune --model.name "$src" --run.out_dir "$OUT/ft-$name" "${FT[@]}"
  fi
done
for spec in "base=smollm2-135m" "adapted=$ADAPTED" "base+ft=$OUT/ft-base/export" "adapted+ft=$OUT/ft-adapted/export"; do
  name=${spec%%=*}; model=${spec#*=}
  [ -f "$OUT/eval-$name.json" ] || "$PY" -m llara_fast.evaluate --model "$model" "${EV[@]}" --out "$OUT/eval-$name.json"
done
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'model':<12} {'nDCG@10':>8} {'MRR@10':>8} {'R@100':>8}  corpus")
for name in ("base", "adapted", "base+ft", "adapted+ft"):
    r = json.loads((out / f"eval-{name}.json").read_text())
    print(f"{name:<12} {r['ndcg@10']:>8.4f} {r['mrr@10']:>8.4f} {r['recall@100']:>8.4f}  {r.get('corpus', 'full')}")
PY
