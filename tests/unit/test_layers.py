"""The package's import structure: imports point down the data flow only, there is no import
cycle, every import of a llara_fast module sits at the top of its module, and every module
imports alone. LAYERS is the layering the README's layout describes (bottom first); a module
may import its own layer or lower ones (a cycle inside a layer fails the cycle check)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "llara_fast"

LAYERS = [
    # leaves: the contract, configs, errors, prompts, the kernels
    ["llara_fast", "llara_fast.errors", "llara_fast.batch", "llara_fast.config", "llara_fast.runtime",
     "llara_fast.templates", "llara_fast.kernels", "llara_fast.kernels.bow_xent", "llara_fast.kernels.linear_xent",
     "llara_fast.kernels.branch_attention",
     "llara_fast.kernels.reference", "llara_fast.data", "llara_fast.data.sources", "llara_fast.data.text"],
    # the model and what it is made of
    ["llara_fast.attention", "llara_fast.lora", "llara_fast.data.records"],
    ["llara_fast.model"],
    # formats: HF key map, safetensors, GGUF, tokenizers
    ["llara_fast.io", "llara_fast.io.hf", "llara_fast.io.st_module", "llara_fast.io.embeddings", "llara_fast.io.lock"],
    # data and objectives
    ["llara_fast.data.shards", "llara_fast.data.packing", "llara_fast.data.native", "llara_fast.data.prepare",
     "llara_fast.data.loader", "llara_fast.data.beir", "llara_fast.data.pairs", "llara_fast.objectives",
     "llara_fast.objectives.llara", "llara_fast.objectives.contrastive"],
    # checkpoints, loading, export, encoding
    ["llara_fast.io.checkpoint", "llara_fast.io.load", "llara_fast.io.export", "llara_fast.encode"],
    # training
    ["llara_fast.train", "llara_fast.train.config", "llara_fast.train.parallel", "llara_fast.train.step",
     "llara_fast.train.report", "llara_fast.train.epochs", "llara_fast.train.trainer"],
    # entry points
    ["llara_fast.pretrain", "llara_fast.finetune", "llara_fast.evaluate", "llara_fast.export",
     "llara_fast.train.evaluation"],  # evaluation during training: the evaluate entry point on the trainer's weights
    ["llara_fast.mine"],
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _resolve(name: str, pkg_modules) -> str:
    """The llara_fast module an imported name lives in (``from llara_fast.io import hf`` -> llara_fast.io.hf)."""
    return name if name in pkg_modules else name.rsplit(".", 1)[0]


def imports(path: Path, pkg_modules) -> tuple[set[str], list[int]]:
    """(llara_fast modules imported at module level, line numbers of llara_fast imports below it)."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    top_nodes = set()
    for node in tree.body:
        stack = [node]
        while stack:  # module level, including inside if/try blocks (guarded imports)
            n = stack.pop()
            top_nodes.add(id(n))
            if isinstance(n, (ast.If, ast.Try)):
                stack.extend(n.body + n.orelse + getattr(n, "finalbody", []) + [h for h in getattr(n, "handlers", [])])
            if isinstance(n, ast.ExceptHandler):
                stack.extend(n.body)
    for n in ast.walk(tree):
        names = []
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("llara_fast"):
            names = [f"{n.module}.{a.name}" for a in n.names]
        elif isinstance(n, ast.Import):
            names = [a.name for a in n.names if a.name.startswith("llara_fast")]
        if not names:
            continue
        if id(n) in top_nodes:
            top.update(_resolve(x, pkg_modules) for x in names)
        else:
            nested.append(n.lineno)
    return top, nested


def test_every_module_has_a_layer():
    assert set(modules()) == set(RANK), "add new modules to LAYERS (and to the README's layout)"


def test_imports_point_down_and_sit_at_the_top():
    mods = modules()
    for name, path in mods.items():
        top, nested = imports(path, mods)
        assert not nested, f"{path}: llara_fast imports inside functions at lines {nested}"
        for dep in top - {name}:
            assert RANK[dep] <= RANK[name], f"{name} (layer {RANK[name]}) imports {dep} (layer {RANK[dep]}): upward"


def test_no_import_cycles():
    mods = modules()
    graph = {name: imports(path, mods)[0] - {name} for name, path in mods.items()}
    graph = {k: {d for d in v if d != "llara_fast"} for k, v in graph.items()}  # the package root imports _C only
    state: dict[str, int] = {}

    def visit(m, trail):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            visit(d, trail + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def third_party_imports() -> list[str]:
    """The package's module-level imports of other packages, as statements (``from transformers
    import LlamaConfig`` too: transformers loads its submodules lazily, on first attribute use)."""
    out = set()
    for path in modules().values():
        for n in ast.parse(path.read_text()).body:
            for node in ([n] + n.body + [x for h in n.handlers for x in h.body] if isinstance(n, ast.Try) else [n]):
                if isinstance(node, ast.Import):
                    out.update(f"import {a.name}" for a in node.names if not a.name.startswith("llara_fast"))
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and not (
                        node.module.startswith("llara_fast") or node.module == "__future__"):
                    out.update(f"from {node.module} import {a.name}" for a in node.names)
    return sorted(out)


@pytest.mark.e2e
def test_every_module_imports_alone():
    """Each module in a fresh process of its own, forked from one that holds only the third-party
    libraries the package imports (so that this takes seconds, not a minute): a cycle or a missing
    llara_fast import shows as an ImportError."""
    code = f"""
import importlib, os, sys
for stmt in {third_party_imports()!r}:  # shared by the forks; optional ones may be missing
    try:
        exec(stmt)
    except Exception:
        pass
failed = []
for name in {sorted(modules())!r}:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as e:
            print(name, type(e).__name__, e, file=sys.stderr)
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED", failed) if failed else print("OK")
sys.exit(1 if failed else 0)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
