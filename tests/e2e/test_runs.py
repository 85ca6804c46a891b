"""Runs that cannot lose work (llara_fast.train.trainer, llara_fast.io.checkpoint): a run directory
belongs to one run, checkpoints are verified and matched to the configuration before a resume,
a refused start changes nothing, SIGTERM saves and exits so that a resume continues exactly,
rotation and disk errors never leave a checkpoint that looks complete but is not. Signals, kills and
bit-exact comparisons run in subprocesses; other single runs call main() here (conftest.run_main)."""
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SAME_ORDER, hooked, run_entry, run_main, step_hashes

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--model.name", "debug", "--model.random_init", "true", "--run.export", "false", "--data.limit", "60",
          "--data.token_budget", "500",
          "--optim.lr", "1e-3", "--optim.warmup_steps", "1"]


def _run(args, hooks=(), check=True, env=None):
    if not hooks and env is None:  # the CLI's main() in this process (conftest.run_main)
        return run_main("llara_fast.pretrain", args, check=check)
    target = hooked("llara_fast.pretrain", *hooks) if hooks else ["-m", "llara_fast.pretrain"]
    return run_entry(target, args, check=check, env=env)


def _metrics(run):
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_a_run_directory_holds_one_run(tmp_path):
    run = tmp_path / "run"
    _run([*COMMON, "--run.steps", "2", "--run.out_dir", str(run)])
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    p = _run([*COMMON, "--run.steps", "2", "--run.out_dir", str(run)], check=False)
    assert p.returncode == 1 and "holds another run" in p.stderr and "--run.resume true" in p.stderr
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}  # nothing of the old run touched
    # a second run while one holds the directory fails at once, naming the holder
    with open(run / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("pid 4242 on testhost since now\n")
        f.flush()
        t0 = time.perf_counter()
        p = _run([*COMMON, "--run.steps", "3", "--run.out_dir", str(run), "--run.resume", "true"], check=False)
        assert p.returncode == 1 and "in use by pid 4242 on testhost" in p.stderr and time.perf_counter() - t0 < 60
    # overwrite: the old run's files go, the new run is alone in its directory
    _run([*COMMON, "--run.steps", "1", "--run.out_dir", str(run), "--run.overwrite", "true"])
    assert [m["step"] for m in _metrics(run)] == [1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000001"]


def test_corrupt_checkpoint_is_detected_and_passed_over(tmp_path):
    run = tmp_path / "run"
    args = [*COMMON, "--run.steps", "4", "--run.ckpt_every", "2", "--run.keep_checkpoints", "0"]
    _run([*args, "--run.out_dir", str(run)])
    newest = run / "checkpoints" / "step_0000004"
    shard = sorted(newest.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = np.random.default_rng(0).bytes(4096)
    shard.write_bytes(bytes(data))
    p = _run([*args, "--run.steps", "5", "--run.out_dir", str(run), "--run.resume", "true"])
    assert f"{shard}: changed since the checkpoint was written" in p.stdout
    assert "resumed from" in p.stdout and "step_0000002 (step 2)" in p.stdout  # the newest one that verifies
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4, 5]  # each step once: rows after step 2 re-run


def test_corruption_probe_is_always_detected(tmp_path):
    """Random bytes at a random place of a random file of a checkpoint: detected in 20 of 20 tries."""
    from llara_fast.errors import UserError
    from llara_fast.io.checkpoint import verify_checkpoint

    run = tmp_path / "run"
    _run([*COMMON, "--run.steps", "1", "--run.out_dir", str(run)])
    ck = run / "checkpoints" / "step_0000001"
    files = sorted(p for p in ck.rglob("*") if p.is_file() and p.name != "COMPLETE")
    rng = np.random.default_rng(1)
    verify_checkpoint(ck)  # intact: passes
    detected = 0
    for _ in range(20):
        f = files[int(rng.integers(len(files)))]
        orig = f.read_bytes()
        n = int(rng.integers(1, min(65536, len(orig)) + 1))
        at = int(rng.integers(0, len(orig) - n + 1))
        junk = rng.bytes(n)
        if junk == orig[at:at + n]:
            continue
        f.write_bytes(orig[:at] + junk + orig[at + n:])
        try:
            verify_checkpoint(ck)
        except UserError as e:
            detected += str(f) in str(e)
        f.write_bytes(orig)
    assert detected == 20


def test_resume_is_refused_for_another_model_or_tokenizer_and_changes_nothing(tmp_path):
    from llara_fast.data.sources import sentencepiece_model_path

    run = tmp_path / "run"
    _run([*COMMON, "--run.steps", "2", "--run.out_dir", str(run)])
    cfg = (run / "config.toml").read_bytes()
    p = _run([*COMMON, "--run.steps", "3", "--run.out_dir", str(run), "--run.resume", "true", "--model.layers", "1"],
             check=False)
    assert p.returncode == 2 and "model.layers was 0 in this run and is 1 now" in p.stderr  # the key, both values
    assert "delete" not in p.stderr  # a checkpoint that verifies is never to be deleted
    p = _run([*COMMON, "--run.steps", "3", "--run.out_dir", str(run), "--run.resume", "true", "--model.tokenizer",
              str(sentencepiece_model_path())], check=False)
    assert p.returncode == 2 and "model.tokenizer was '' in this run" in p.stderr
    assert (run / "config.toml").read_bytes() == cfg  # a refused start writes nothing
    assert [m["step"] for m in _metrics(run)] == [1, 2]


def _start(args, hooks=(), env=None):
    cmd = [sys.executable, *(hooked("llara_fast.pretrain", *hooks) if hooks else ["-m", "llara_fast.pretrain"]), *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def _wait_for_step(run: Path, step: int, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (run / "metrics.jsonl").is_file() and len(_metrics(run)) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run did not reach step {step}")


def test_stop_signal_saves_and_resume_continues_exactly(tmp_path):
    """SIGTERM mid-run: the step finishes, is saved, exit 75; the resume equals an unstopped run
    bit for bit (the same computation in the same order: SAME_ORDER). (SIGINT takes the same
    handler: tests/unit/test_trainer.py.)"""
    sig = signal.SIGTERM
    args = [*COMMON, "--run.steps", "6"]
    full = tmp_path / "full"
    _run([*args, "--run.out_dir", str(full)], hooks=("--hash-dir", str(tmp_path / "h_full")), env=SAME_ORDER)
    run = tmp_path / "run"
    proc = _start([*args, "--run.out_dir", str(run)], hooks=("--hash-dir", str(tmp_path / "h_run")), env=SAME_ORDER)
    _wait_for_step(run, 2, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    stopped = len(_metrics(run))
    assert proc.returncode == 75, err[-2000:]
    assert f"stopped by {sig.name} after step {stopped}" in err and "--run.resume true" in err
    assert (run / "checkpoints" / f"step_{stopped:07d}" / "COMPLETE").is_file()
    _run([*args, "--run.out_dir", str(run), "--run.resume", "true"], hooks=("--hash-dir", str(tmp_path / "h_run")),
         env=SAME_ORDER)
    got, want = _metrics(run), _metrics(full)
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(got, want):
        for k in ("loss", "lm", "ebae", "ebar", "grad_norm"):
            assert a[k] == b[k], (a["step"], k)
    assert step_hashes(tmp_path / "h_run") == step_hashes(tmp_path / "h_full")  # the same data order


def test_rotation_and_disk_errors_leave_no_false_checkpoint(tmp_path, monkeypatch):
    """In one process: a kill while rotation deletes (simulated: the delete raises) leaves no old
    step_N that looks complete; ENOSPC during a save gives one line naming the path and the error,
    removes the partial directory and keeps the previous checkpoint."""
    import shutil

    import torch
    import torch.distributed as dist

    from llara_fast.errors import UserError
    from llara_fast.io import checkpoint as ck
    from llara_fast.train.trainer import init_distributed

    class Loader:
        def state_dict(self):
            return {"pos": 1}

    # a 1-process group in this process; the variables go back when the test ends (later tests'
    # subprocesses inherit the environment)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(29000 + os.getpid() % 1000)}.items():
        monkeypatch.setenv(k, v)
    init_distributed("cpu")
    try:
        module = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(module.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        state = ck.TrainState(module, opt, sched, Loader())
        out = tmp_path / "run"
        ck.save_checkpoint(out, 1, state, keep=1, identity={"model_args": {}})
        real_rmtree = shutil.rmtree

        def killed(path, *a, **k):
            if Path(path).name.startswith(".trash-"):
                raise KeyboardInterrupt("killed mid-deletion")
            return real_rmtree(path, *a, **k)
        monkeypatch.setattr(ck.shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            ck.save_checkpoint(out, 2, state, keep=1, identity={"model_args": {}})
        monkeypatch.setattr(ck.shutil, "rmtree", real_rmtree)
        steps = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
        assert steps == ["step_0000002"] and ck.latest_checkpoint(out).name == "step_0000002"
        ck.clean_partial(out)
        assert not list((out / "checkpoints").glob(".trash-*"))

        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(ck.dcp, "save", full)
        with pytest.raises(UserError, match=r"step_0000003\.tmp: could not write the checkpoint \(\[Errno 28\] No "
                                            r"space left on device \(ENOSPC\)\)"):
            ck.save_checkpoint(out, 3, state, keep=1, identity={"model_args": {}})
        assert not (out / "checkpoints" / "step_0000003.tmp").exists()
        ck.verify_checkpoint(out / "checkpoints" / "step_0000002")  # the previous one, intact

        def read_only(self, *a, **k):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        monkeypatch.setattr(ck.Path, "mkdir", read_only)  # the checkpoints directory became read-only
        with pytest.raises(UserError, match=r"step_0000004\.tmp: could not write the checkpoint \(.*Permission denied"):
            ck.save_checkpoint(out, 4, state, keep=1, identity={"model_args": {}})
        monkeypatch.undo()
        ck.verify_checkpoint(out / "checkpoints" / "step_0000002")
    finally:
        dist.destroy_process_group()


def test_finetune_resume_checks_its_data(tmp_path):
    """Another pairs file with as many records is not the data of the checkpoint."""
    def pairs(path, word):
        path.write_text("".join(json.dumps({"query": f"{word} query {i}", "pos": [f"{word} passage {i}"],
                                            "neg": [f"{word} other {i}", f"{word} more {i}"]}) + "\n"
                                for i in range(8)))
        return path
    a, b = pairs(tmp_path / "a.jsonl", "alpha"), pairs(tmp_path / "b.jsonl", "beta")
    args = ["--model.name", "debug", "--model.random_init", "true", "--data.negatives", "2", "--run.export", "false",
            "--run.out_dir", str(tmp_path / "run")]
    run_main("llara_fast.finetune", [*args, "--data.train", str(a), "--run.steps", "2"])
    p = run_main("llara_fast.finetune", [*args, "--data.train", str(b), "--run.steps", "3", "--run.resume", "true"],
                 check=False)
    assert p.returncode == 2 and f"data.train was '{a}' in this run and is '{b}' now" in p.stderr
    pairs(a, "beta")  # the same file name, other records: the content is checked too
    p = run_main("llara_fast.finetune", [*args, "--data.train", str(a), "--run.steps", "3", "--run.resume", "true"],
                 check=False)
    assert p.returncode == 1 and "the checkpoint's data is" in p.stderr


def test_checkpoint_of_before_the_manifests_still_resumes_and_exports(tmp_path):
    """A COMPLETE marker as the trainer wrote it before the manifests ({"step", "world_size"} only):
    the checkpoint resumes (unverified: nothing to verify against) and exports."""
    from llara_fast.io.load import load

    run = tmp_path / "run"
    args = [*COMMON, "--run.out_dir", str(run)]
    _run([*args, "--run.steps", "2"])
    ck = run / "checkpoints" / "step_0000002"
    (ck / "COMPLETE").write_text(json.dumps({"step": 2, "world_size": 1}))
    model, tok, _ = load(str(ck), attn_backend="sdpa")
    assert model.args.n_layers == 2 and len(tok) == 49168
    p = _run([*args, "--run.steps", "3", "--run.resume", "true", "--run.export", "true"])
    assert "resumed from" in p.stdout and "(step 2)" in p.stdout
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3]
    assert (run / "export" / "config.json").is_file()


def test_a_diverged_run_stops_and_saves_nothing_of_it(tmp_path):
    """lr 1e3 on the debug model blows up at step 2 (loss ~6e6): the run stops there with one line
    and exit 1, and no checkpoint holds a diverged step; a healthy start saves as usual."""
    run = tmp_path / "run"
    p = _run([*COMMON, "--optim.lr", "1e3", "--run.steps", "8", "--run.ckpt_every", "2", "--run.out_dir", str(run)],
             check=False)
    assert p.returncode == 1, p.stderr[-2000:]
    err = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(err) == 1 and "diverged at step 2: loss" in err[0] and "no checkpoint was saved" in err[0]
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").glob("step_*"))
    assert [m["step"] for m in _metrics(run)] == [1, 2]  # the diverged step is on record


def test_resume_from_the_runs_own_config_records_what_changed(tmp_path):
    """`--run.resume true` alone continues a run from its own config.toml, from any working
    directory; settings that cannot change mid-run are refused naming the key and both values (and
    leave config.toml as it was); a new lr applies from the resume step and is recorded in
    config.toml's [[resumed]] history; run.steps at or below the checkpoint's step is refused."""
    import tomllib

    run = tmp_path / "run"
    _run([*COMMON, "--run.steps", "4", "--run.ckpt_every", "2", "--run.out_dir", str(run)])
    before = (run / "config.toml").read_text()
    for flag, value, old in (("--data.grad_accum", "2", "1"), ("--data.token_budget", "400", "500"),
                             ("--model.name", "smollm2-135m", "'debug'")):
        p = run_main("llara_fast.pretrain", ["--run.resume", "true", "--run.out_dir", str(run), "--run.steps", "6",
                                             flag, value], check=False)
        assert p.returncode == 2 and f"{flag[2:]} was {old} in this run" in p.stderr, p.stderr[-1500:]
        assert (run / "config.toml").read_text() == before
    p = run_main("llara_fast.pretrain", ["--run.resume", "true", "--run.out_dir", str(run), "--run.steps", "4"],
                 check=False)
    assert p.returncode == 1 and "the checkpoint is at step 4: nothing to do" in p.stderr
    # from another working directory, only the run directory and what changes
    p = subprocess.run([sys.executable, "-m", "llara_fast.pretrain", "--run.resume", "true", "--run.out_dir",
                        str(run), "--run.steps", "6", "--optim.lr", "5e-4"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                   "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resume: optim.lr 0.001 -> 0.0005, from step 5" in p.stdout
    rows = _metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[3]["lr"] <= 1e-3 and 0 < rows[4]["lr"] <= 5e-4  # each step logs the lr it used
    cfg = tomllib.loads((run / "config.toml").read_text())
    assert cfg["optim"]["lr"] == 5e-4 and cfg["run"]["steps"] == 6 and cfg["data"]["limit"] == 60
    assert cfg["run"]["out_dir"] == str(run) and cfg["resumed"] == [
        {"step": 4, "changed": ["optim.lr: 0.001 -> 0.0005", "run.steps: 4 -> 6"]}]


def test_a_token_budget_below_the_longest_example_is_refused_up_front(tmp_path):
    """One line naming the budget and the minimum, before config.toml is written (so the corrected
    command then runs without --run.overwrite)."""
    run = tmp_path / "run"
    p = _run([*COMMON, "--data.token_budget", "60", "--run.steps", "1", "--run.out_dir", str(run)], check=False)
    assert p.returncode == 2 and "token budget 60 (data.token_budget) is below the longest example" in p.stderr, \
        p.stderr[-1500:]
    assert "raise it to at least" in p.stderr and not (run / "config.toml").exists()
    _run([*COMMON, "--run.steps", "1", "--run.out_dir", str(run)])  # the corrected rerun
