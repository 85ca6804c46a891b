#!/usr/bin/env bash
# Runs the numerics tests (every test that compares a low-precision result with a float64 truth
# under tests/errmodel.py's worst-case bounds, and the float64 algebra checks) under settings that
# change the summation order and the instruction set, and prints one line per setting. Not part
# of the default suite (about 3-5 min per setting on 2 cores).
#
#     scripts/numerics_matrix.sh [LOGDIR]        (default: numerics-matrix-logs/)
#
# Each line: the setting, the CPU capability torch reports under it, pass/fail and pytest's tail.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOG=${1:-numerics-matrix-logs}
mkdir -p "$LOG"
TESTS=(tests/unit/test_errmodel.py tests/unit/test_llara.py tests/kernels/test_bow_xent.py
       tests/kernels/test_linear_xent.py tests/kernels/test_branch_attention.py tests/unit/test_attention.py
       tests/unit/test_model.py tests/unit/test_contrastive.py "tests/unit/test_evaluate.py::test_search_exact_and_to_run")
SETTINGS=(
  "all-cores:"
  "one-thread:OMP_NUM_THREADS=1 MKL_NUM_THREADS=1"
  "aten-default:ATEN_CPU_CAPABILITY=default"
  "aten-avx2:ATEN_CPU_CAPABILITY=avx2"
  "aten-avx512:ATEN_CPU_CAPABILITY=avx512"
  "mkl-sse4_2:MKL_ENABLE_INSTRUCTIONS=SSE4_2"
  "mkl-avx2:MKL_ENABLE_INSTRUCTIONS=AVX2"
  "mkl-cbwr-compatible:MKL_CBWR=COMPATIBLE"
  "shuffled-matmul:LLARA_TEST_MATMUL=shuffled"
)
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'); flags: $(grep -o -w -E 'avx2|avx512f|avx512bw|avx512vl|avx512_vnni|avx512_bf16|avx512_fp16|amx_bf16|fma' /proc/cpuinfo | sort -u | tr '\n' ' ')"
fail=0
for s in "${SETTINGS[@]}"; do
  name=${s%%:*}; vars=${s#*:}
  if [ "$name" = aten-avx512 ] && ! grep -qw avx512f /proc/cpuinfo; then
    printf '%-22s %-28s %-5s\n' "$name" "-" "skipped: this CPU has no AVX-512 (torch would run AVX-512 kernels: SIGILL)"
    continue
  fi
  cap=$(env $vars "$PY" -c 'import torch; print(torch.backends.cpu.get_cpu_capability(), "threads", torch.get_num_threads())')
  start=$(date +%s)
  env $vars "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" > "$LOG/$name.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || fail=1
  printf '%-22s %-28s %-5s %4ss  %s\n' "$name" "$cap" "$([ $rc -eq 0 ] && echo pass || echo FAIL)" \
    "$(( $(date +%s) - start ))" "$(tail -1 "$LOG/$name.log")"
done
exit $fail
