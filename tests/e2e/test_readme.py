"""The README's commands run as written from a fresh clone (issue 27.8).

Every command of a ```bash block and every ```python block runs, in the README's order, in one
fresh working directory (so `runs/`, `data/` and the files a command writes land there and later
commands read them), with this interpreter as the venv's `python` and `torchrun` (a PATH shim;
`./scripts/setup.sh` and `source .venv/bin/activate` are the setup, not run here). The test adds
small limits only: LIMITS appended to each command of a job, and the tiny `debug` model where a
training command names no model. BEIR commands read `data/beir/scifact`, which the test links to
the project's copy (no download at test time); torchrun commands run as written (2 processes,
gloo on CPU). A plain `python -m llara_fast.X ARGS` runs its main(ARGS) in this process, in that
directory (conftest.run_main: the same CLI code, exit code and output, without the subprocess's
imports); every other command runs in bash. Indented blocks hold placeholders and are not run."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_main

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SCIFACT = ROOT.parent / "shared" / "data" / "beir" / "scifact"
SETUP = {"./scripts/setup.sh", "source .venv/bin/activate"}
LIMITS = {  # module -> flags appended: a few steps on a few records
    "llara_fast.pretrain": ["--run.steps", "2", "--data.limit", "16"],
    "llara_fast.finetune": ["--run.steps", "2", "--data.limit", "16"],
    "llara_fast.data.prepare": ["--limit", "16", "--workers", "1", "--no-progress"],
    "llara_fast.evaluate": ["--max-docs", "100", "--quiet"],
}
TINY = ["--model.name", "debug", "--model.random_init", "true"]  # for a training command that names no model


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every ```bash and ```python block, in order."""
    return re.findall(r"^```(bash|python)\n(.*?)^```", text, flags=re.M | re.S)


def commands(body: str) -> list[str]:
    """The shell commands of a bash block: continuation lines joined, blanks and comments dropped."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def without_setup(cmd: str) -> str:
    """The command less its setup steps (``./scripts/setup.sh && source ... && python ...``)."""
    return " && ".join(part for part in cmd.split(" && ") if part.strip() not in SETUP)


def small(cmd: str) -> str:
    """The command with the test's limits appended (unchanged for any other command)."""
    m = re.search(r"-m (llara_fast[\w.]*)", cmd)
    extra = list(LIMITS.get(m.group(1), [])) if m else []
    if m and m.group(1) in ("llara_fast.pretrain", "llara_fast.finetune") and "--model.name" not in cmd:
        extra += TINY
    return cmd + "".join(" " + shlex.quote(x) for x in extra)


def in_process(cmd: str) -> tuple[str, list[str]] | None:
    """(module, argv) of a plain `python -m llara_fast.X ARGS` command (no shell syntax), which the
    test runs through conftest.run_main (the same main(argv), without a subprocess's 8-10 s of
    imports); None for any other command (torchrun, echo, redirections), run by bash."""
    if any(c in cmd for c in "|&;<>$`"):
        return None
    words = shlex.split(cmd)
    if words[:2] == ["python", "-m"] and len(words) > 2 and words[2].startswith("llara_fast."):
        return words[2], words[3:]
    return None


def test_blocks_are_found():
    """The parser sees the README's runnable blocks (a test over nothing would pass)."""
    found = blocks(README.read_text())
    cmds = [c for lang, body in found if lang == "bash" for c in commands(body)]
    assert sum(lang == "python" for lang, _ in found) >= 2
    for needed in ("-m llara_fast.pretrain", "-m llara_fast.data.prepare", "-m llara_fast.finetune",
                   "-m llara_fast.evaluate", "-m llara_fast.data.pairs", "torchrun --nproc_per_node 2"):
        assert any(needed in c for c in cmds), needed
    assert not any("../shared" in c for c in cmds)  # a user's clone has no ../shared
    assert without_setup(cmds[0]) == "python -m llara_fast.pretrain"  # the README's first line: setup, then the job
    assert small("python -m llara_fast.pretrain --run.out_dir r").endswith("--model.random_init true")
    assert "debug" not in small("python -m llara_fast.finetune --model.name runs/default")
    assert in_process("python -m llara_fast.evaluate --model 'a b'") == ("llara_fast.evaluate", ["--model", "a b"])
    assert in_process("torchrun --nproc_per_node 2 -m llara_fast.pretrain") is None
    assert in_process("python -m llara_fast.pretrain > log.txt") is None


@pytest.mark.skipif(not (SCIFACT / "corpus.jsonl").is_file(), reason=f"{SCIFACT} is absent")
def test_readme_commands_run_as_written(tmp_path):
    work, shim = tmp_path / "clone", tmp_path / "bin"
    work.mkdir()
    shim.mkdir()
    for name, line in (("python", f'exec {shlex.quote(sys.executable)} "$@"'),
                       ("torchrun", f'exec {shlex.quote(sys.executable)} -m torch.distributed.run --standalone "$@"')):
        (shim / name).write_text(f"#!/bin/sh\n{line}\n")
        (shim / name).chmod(0o755)
    (work / "data" / "beir").mkdir(parents=True)
    (work / "data" / "beir" / "scifact").symlink_to(SCIFACT)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ran = []
    for i, (lang, body) in enumerate(blocks(README.read_text())):
        if lang == "python":
            (tmp_path / f"block{i}.py").write_text(body)
            todo = [f"python {shlex.quote(str(tmp_path / f'block{i}.py'))}"]
        else:
            todo = [small(c) for c in map(without_setup, commands(body)) if c]
        for cmd in todo:
            job = in_process(cmd)
            if job:  # `python -m llara_fast.X ARGS`: its main(ARGS) in this process, in the clone directory
                p = run_main(job[0], job[1], check=False, cwd=work)
            else:
                p = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True, timeout=400)
            assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
            ran.append(cmd)
    assert len(ran) >= 10
    for out in ("runs/default/export", "runs/two/export", "runs/released/checkpoints", "runs/released-fly/export",
                "runs/scifact-pairs/export", "runs/scifact/export", "runs/api/export", "pairs.jsonl"):
        assert (work / out).exists(), out
