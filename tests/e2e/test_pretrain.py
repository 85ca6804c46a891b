"""The trainer end to end on CPU: FSDP over 2 gloo processes, exact resume after kill -9,
and clear errors. Runs `llara_fast.pretrain` as users do: under torchrun, and in a subprocess where the
process matters (kill, thread count); a single run otherwise calls its main() in this process
(conftest.run_main: the same CLI path, exit code and output, without 8-10 s of imports)."""
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SAME_ORDER, _float64_norms_and_rope, hooked, run_entry, run_main, step_hashes
from errmodel import ALGEBRA_RTOL, EMB_ATOL

COMMON = ["--model.name", "debug", "--model.random_init", "true", "--run.export", "false", "--data.token_budget", "500",
          "--optim.lr", "1e-3", "--optim.warmup_steps", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from llara_fast.data.prepare import PrepareOptions, prepare
    from llara_fast.io.hf import resolve_source

    out = tmp_path_factory.mktemp("data") / "wiki"
    prepare(None, "wiki-sample", str(resolve_source("smollm2-135m")), 96, out,
            PrepareOptions(limit=150, progress=False, workers=1))
    return out


def _run(args, nproc=1, hooks=(), check=True, env=None):
    if nproc == 1 and not hooks and env is None:  # the CLI's main() in this process (conftest.run_main)
        return run_main("llara_fast.pretrain", args, check=check)
    target = hooked("llara_fast.pretrain", *hooks) if hooks else ["-m", "llara_fast.pretrain"]
    return run_entry(target, args, nproc, check=check, env=env)


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_two_processes_match_one_and_learn(tmp_path, data_dir):
    """Same global batch: 1 process × 2 accumulated micro-batches == 2 processes × 1."""
    one, two = tmp_path / "one", tmp_path / "two"
    f64 = ["--run.dtype", "float64"]  # algebra: float64 on both sides, so ALGEBRA_RTOL (tests/errmodel.py)
    _run([*COMMON, *f64, "--data.dir", str(data_dir), "--run.steps", "5", "--run.out_dir", str(one),
          "--data.grad_accum", "2"], hooks=("--hash-dir", str(tmp_path / "h1")))
    _run([*COMMON, *f64, "--data.dir", str(data_dir), "--run.steps", "5", "--run.out_dir", str(two)], nproc=2,
         hooks=("--hash-dir", str(tmp_path / "h2")))
    a, b = _metrics(one), _metrics(two)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4, 5]
    assert step_hashes(tmp_path / "h1") == step_hashes(tmp_path / "h2")  # the same global batches
    for x, y in zip(a, b):
        assert x["passages"] == y["passages"] and x["tokens"] == y["tokens"]
        for k in ("loss", "lm", "ebae", "ebar", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=ALGEBRA_RTOL, abs=0), (x["step"], k)
    assert a[-1]["loss"] < a[0]["loss"] - 0.05  # it learns
    assert (one / "checkpoints" / "step_0000005" / "COMPLETE").is_file()
    assert (one / "config.toml").is_file()


def test_resume_after_kill_is_exact(tmp_path, data_dir):
    """The resumed run equals the unstopped one bit for bit (the same computation in the same order:
    SAME_ORDER)."""
    args = [*COMMON, "--data.dir", str(data_dir), "--run.steps", "6", "--run.ckpt_every", "2"]
    full = tmp_path / "full"
    _run([*args, "--run.out_dir", str(full)], hooks=("--hash-dir", str(tmp_path / "h_full")), env=SAME_ORDER)
    crashed = tmp_path / "crashed"
    p = _run([*args, "--run.out_dir", str(crashed)], hooks=("--crash-at", "5"), check=False, env=SAME_ORDER)
    assert p.returncode == -9
    ck = sorted((crashed / "checkpoints").iterdir())
    assert [c.name for c in ck][-1] == "step_0000004"  # step 5 ran but was not saved
    _run([*args, "--run.out_dir", str(crashed), "--run.resume", "true"], hooks=("--hash-dir", str(tmp_path / "h_res")),
         env=SAME_ORDER)
    want = {m["step"]: m for m in _metrics(full)}
    got = _metrics(crashed)
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]  # step 5 re-run after the crash, its first row dropped
    full_hashes = step_hashes(tmp_path / "h_full")
    assert step_hashes(tmp_path / "h_res") == {5: full_hashes[5], 6: full_hashes[6]}  # the same batches
    for m in got[-2:]:
        w = want[m["step"]]
        for k in ("loss", "lm", "ebae", "ebar", "grad_norm"):
            assert m[k] == w[k], (m["step"], k)


def test_clear_errors(tmp_path, data_dir, capsys):
    from llara_fast.data.prepare import PrepareOptions, prepare
    from llara_fast.data.sources import sentencepiece_model_path
    from llara_fast.pretrain import main

    # config errors stop before any work: exit 2, one line (in this process: the CLI's own path)
    assert main(["--run.stepz", "3"]) == 2
    assert "unknown key run.stepz; did you mean run.steps?" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text("[optim]\nlr = 'fast'\n")
    assert main(["--config", str(cfg)]) == 2 and "optim.lr: expected float" in capsys.readouterr().err

    other = tmp_path / "other"
    prepare(None, "wiki-sample", str(sentencepiece_model_path()), 96, other,
            PrepareOptions(limit=20, progress=False, workers=1))
    p = _run([*COMMON, "--data.dir", str(other), "--run.steps", "1", "--run.out_dir", str(tmp_path / "r")],
             check=False)
    assert p.returncode != 0 and "prepare the data again with this model's tokenizer" in p.stderr

    p = _run([*COMMON, "--data.dir", str(data_dir), "--data.cutoff_len", "128", "--run.steps", "1",
              "--run.out_dir", str(tmp_path / "r1")], check=False)  # data_dir: max_len 96, i.e. cutoff 96 + 37
    assert p.returncode != 0 and "prepared with cutoff_len 133, but data.cutoff_len is 128" in p.stderr

    run = tmp_path / "r2"
    _run([*COMMON, "--data.dir", str(data_dir), "--run.steps", "1", "--run.out_dir", str(run)])
    ck = run / "checkpoints" / "step_0000001"
    for f in ck.glob("*.distcp"):
        f.write_bytes(b"garbage")
    p = _run([*COMMON, "--data.dir", str(data_dir), "--run.steps", "2", "--run.out_dir", str(run),
              "--run.resume", "true"], check=False)
    assert p.returncode != 0 and f"checkpoint {ck.name} does not verify" in p.stdout and "no checkpoint" in p.stderr


def test_cutoff_len_prepares_on_the_fly(tmp_path):
    """data.cutoff_len: the on-the-fly preparation cuts as the released code (TEXT = cutoff minus
    the 37 prompt tokens of SmolLM2's tokenizer, targets at the cutoff)."""
    out = tmp_path / "runs" / "cut"
    p = _run([*COMMON, "--data.limit", "16", "--data.cutoff_len", "77", "--run.steps", "1", "--run.out_dir", str(out)])
    assert "data: data.limit reads the first 16 records of wiki-sample; --data.limit 0 reads all" in p.stdout
    (manifest,) = (tmp_path / "runs" / "data").glob("*/manifest.json")
    m = json.loads(manifest.read_text())
    assert (m["cutoff_len"], m["max_len"], m["target_max_len"]) == (77, 40, 77)
    assert "cutoff_len = 77" in (out / "config.toml").read_text()


def test_model_tokenizer_option(tmp_path):
    """A preset without weights trained with another tokenizer (here the SentencePiece LLaMA
    one): the data is prepared with it, the token ids fit the
    embedding, and the checkpoint reloads with that tokenizer."""
    from llara_fast.data.sources import sentencepiece_model_path
    from llara_fast.io.load import load

    spm = str(sentencepiece_model_path())
    out = tmp_path / "run"
    _run(["--model.name", "debug", "--model.random_init", "true", "--model.tokenizer", spm, "--data.limit", "16",
          "--data.token_budget", "500",
          "--run.steps", "1", "--run.out_dir", str(out)])
    assert f'tokenizer = "{spm}"' in (out / "config.toml").read_text()
    model, tok, _ = load(str(out / "checkpoints" / "step_0000001"))
    assert len(tok) == 32016 <= model.args.vocab_size  # the debug preset keeps its 49,152 rows
    assert tok.convert_tokens_to_ids("<s16>") == 32015


def test_random_init_preset(tmp_path):
    """`model.random_init` trains a weights-shipping preset's shape from random weights (the speed
    runs on a GPU machine without the weights package); the checkpoint reloads at L blocks."""
    from llara_fast.io.load import load

    out = tmp_path / "run"
    _run(["--model.name", "smollm2-135m", "--model.random_init", "true", "--model.layers", "1",
          "--data.limit", "16", "--data.token_budget", "500", "--run.steps", "2", "--run.out_dir", str(out)])
    assert "random_init = true" in (out / "config.toml").read_text()
    first = _metrics(out)[0]
    for part in ("lm", "ebae", "ebar"):  # near-uniform logits at random init (1 real block gives 15-22)
        assert first[part] == pytest.approx(math.log(49168), abs=0.3), part
    model, tok, _ = load(str(out / "checkpoints" / "step_0000002"))
    assert model.args.n_layers == 1 and model.args.dim == 576 and len(tok) == 49168


def test_two_nodes_match_one_node(tmp_path, data_dir):
    """The README's multi-node launch: two torchrun agents with --nnodes 2 (c10d rendezvous on
    loopback, one process each) run exactly the steps of one agent with 2 processes."""
    import os
    import subprocess
    import sys

    from conftest import free_port

    args = [*COMMON, "--data.dir", str(data_dir), "--run.steps", "3", "--run.ckpt_every", "3"]
    _run([*args, "--run.out_dir", str(tmp_path / "one")], nproc=2, hooks=("--hash-dir", str(tmp_path / "h1")))
    endpoint = f"127.0.0.1:{free_port()}"
    # torchrun gives each process one thread when it starts several per node; the same here, so
    # that both runs reduce in the same order inside each process.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    agents = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "t2n",
               *hooked("llara_fast.pretrain", "--hash-dir", str(tmp_path / "h2")), *args,
               "--run.out_dir", str(tmp_path / "two")]
        agents.append(subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, env=env))
    outs = [a.communicate(timeout=300)[0] for a in agents]
    for node, (a, out) in enumerate(zip(agents, outs)):
        assert a.returncode == 0, f"node {node}:\n{out[-3000:]}"
    assert step_hashes(tmp_path / "h1") == step_hashes(tmp_path / "h2")  # the same global batches
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["step"] for m in two] == [1, 2, 3]
    for x, y in zip(one, two):
        for k in ("loss", "lm", "ebae", "ebar", "passages", "tokens", "grad_norm"):
            assert x[k] == y[k], (x["step"], k)  # the same world and reductions: bit for bit
    assert (tmp_path / "two" / "checkpoints" / "step_0000003" / "COMPLETE").is_file()


def test_on_the_fly_cache_follows_the_input_content(tmp_path):
    """The on-the-fly data cache is named by the input's content: the same path rewritten with
    other documents prepares again (and says so), the unchanged file is reused (and says where)."""
    from itertools import islice

    from llara_fast.data.sources import iter_wiki_sample

    paras = [t for _, t in islice(iter_wiki_sample(), 140)]
    src = tmp_path / "in.jsonl"

    def write(docs):
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))

    def run(name):
        p = _run([*COMMON, "--data.format", "text", "--data.input", str(src), "--data.limit", "0",
                  "--run.steps", "1", "--run.out_dir", str(tmp_path / "runs" / name)])
        return p.stdout

    write(paras[:20])
    assert "data: preparing" in run("a")
    write(paras[20:140])  # the same path, other (and more) documents
    out = run("b")
    assert "data: preparing" in out and "reusing" not in out
    manifests = sorted((tmp_path / "runs" / "data").glob("*/manifest.json"))
    counts = sorted(json.loads(m.read_text())["counts"]["records"] for m in manifests)
    assert len(manifests) == 2 and counts == [20, 120], counts
    out = run("c")  # unchanged: reused, the cache's path named
    assert "data: reusing" in out and str(tmp_path / "runs" / "data") in out


def test_epochs_warmup_ratio_and_export(tmp_path):
    """`--run.epochs 2 --optim.warmup_ratio 0.25` from random weights: the first log line says the
    weights are random; the start line's step count is the steps run; every record has its epoch and
    the last step is the one that completes epoch 2; the lr each step logs is the warmup-ratio
    schedule's. RUN/export (written after the last checkpoint) loads in transformers' AutoModel with
    exactly the checkpoint's weights and in sentence-transformers, whose embeddings are the Encoder's
    on the final checkpoint (both in float64, each rounded once to fp32)."""
    import re

    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from llara_fast.encode import Encoder
    from llara_fast.io.hf import ours_to_hf
    from llara_fast.io.load import load
    from llara_fast.train.step import lr_lambda

    out = tmp_path / "run"
    p = _run([*COMMON, "--data.limit", "40", "--data.token_budget", "2000", "--run.epochs", "2",
              "--optim.warmup_steps", "2", "--optim.warmup_ratio", "0.25", "--run.out_dir", str(out),
              "--run.export", "true"])
    lines = p.stdout.splitlines()
    assert lines[0] == "model: random weights (debug's shape, seed 0; tokenizer of SmolLM2)"
    n = int(re.search(r"^run: 2 epochs = (\d+) steps \(", p.stdout, re.M).group(1))
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, n + 1))
    epochs = [r["epoch"] for r in rows]
    assert 0 < epochs[0] and epochs == sorted(epochs) and epochs[-2] < 2 <= epochs[-1]
    warmup = math.ceil(0.25 * n)
    f = lr_lambda(warmup, n, "cosine", 0.1)
    assert [r["lr"] for r in rows] == [1e-3 * f(s) for s in range(n)]  # the lr each step used
    assert rows[warmup - 2]["lr"] < 1e-3 == rows[warmup - 1]["lr"]
    ckpt = out / "checkpoints" / f"step_{n:07d}"
    assert (ckpt / "COMPLETE").is_file() and f"exported {out / 'export'}" in p.stdout

    trained, tok, _ = load(str(ckpt))
    hf = AutoModel.from_pretrained(str(out / "export"), dtype=torch.float32)
    want = {k.removeprefix("model."): v for k, v in ours_to_hf(trained.state_dict()).items() if k != "lm_head.weight"}
    got = hf.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    texts = ["The llama is a domesticated South American camelid.", "Paris is the capital of France.", ""]
    st = SentenceTransformer(str(out / "export"), trust_remote_code=True, device="cpu",
                             model_kwargs={"dtype": torch.float64})
    assert next(st.parameters()).dtype == torch.float64
    _float64_norms_and_rope(st[0].model)  # transformers rounds norms and RoPE angles to fp32 in any dtype
    enc = Encoder(trained, tok, device="cpu", dtype=torch.float64)
    for kind, fn in (("query", st.encode_query), ("passage", st.encode_document)):
        theirs = torch.as_tensor(fn(texts, convert_to_tensor=True)).float()
        ours = enc.encode(texts, kind)
        # each side: the same float64 algebra, then one rounding to fp32: at most one ulp apart
        torch.testing.assert_close(theirs.double(), ours.double(), rtol=0, atol=EMB_ATOL,
                                   msg=lambda m: f"{kind}: {m}")
