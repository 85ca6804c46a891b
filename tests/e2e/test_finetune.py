"""`llara_fast.finetune` end to end (torchrun and kill -9 in subprocesses, single runs through main() in
this process: conftest.run_main): FSDP with cross-rank
negatives (1 process == 2 processes for the same global batch), exact resume after kill -9,
LoRA merged on export, bad input skipped and counted."""
import json
from pathlib import Path

import pytest
import torch
from conftest import SAME_ORDER, hooked, run_entry, run_main
from errmodel import ALGEBRA_RTOL

COMMON = ["--model.name", "debug", "--model.random_init", "true", "--data.limit", "24", "--data.negatives", "2",
          "--optim.lr", "1e-3", "--optim.warmup_steps", "1", "--run.export", "false"]


def _run(args, nproc=1, hooks=(), check=True, env=None):
    if nproc == 1 and not hooks and env is None:  # the CLI's main() in this process (conftest.run_main)
        return run_main("llara_fast.finetune", args, check=check)
    target = hooked("llara_fast.finetune", *hooks) if hooks else ["-m", "llara_fast.finetune"]
    return run_entry(target, args, nproc, check=check, env=env)


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_grad_cache_run_matches_one_piece(tmp_path):
    """contrastive.grad_cache with chunks of 1 query, in 1 process and in 2 (FSDP, cross-rank
    negatives): the 4-query step of the one-piece run, step for step (the same queries, one
    contrastive batch); a chunk that does not divide is refused."""
    one, cached = tmp_path / "one", tmp_path / "cached"
    f64 = ["--run.dtype", "float64"]  # algebra: float64 on every side, so ALGEBRA_RTOL (tests/errmodel.py)
    _run([*COMMON, *f64, "--data.queries", "4", "--run.steps", "2", "--run.out_dir", str(one)])
    _run([*COMMON, *f64, "--data.queries", "4", "--run.steps", "2", "--run.out_dir", str(cached),
          "--contrastive.grad_cache", "true", "--contrastive.chunk", "1"])
    # and over 2 FSDP processes, each with 2 queries in chunks of 1, negatives shared across ranks
    two = tmp_path / "two"
    _run([*COMMON, *f64, "--data.queries", "2", "--run.steps", "2", "--run.out_dir", str(two),
          "--contrastive.grad_cache", "true", "--contrastive.chunk", "1"], nproc=2)
    for run in (cached, two):
        for x, y in zip(_metrics(one), _metrics(run), strict=True):
            assert x["queries"] == y["queries"] == 4 and x["passages"] == y["passages"]
            for k in ("loss", "accuracy", "grad_norm"):
                assert x[k] == pytest.approx(y[k], rel=ALGEBRA_RTOL, abs=0), (run.name, x["step"], k)
    p = _run([*COMMON, "--data.queries", "4", "--run.steps", "1", "--run.out_dir", str(tmp_path / "bad"),
              "--contrastive.grad_cache", "true", "--contrastive.chunk", "3"], check=False)
    assert p.returncode != 0 and "must divide" in p.stderr


def test_two_processes_share_negatives_and_match_one(tmp_path):
    """4 queries per step: 1 process x 4 == 2 processes x 2 with passages gathered across ranks,
    step for step, and so are the evaluations during training (eval.every 1 with keep_best: the
    full weights gathered, rank 0 evaluates, rank 1 waits) and the best step kept."""
    from conftest import write_wiki_beir

    beir = write_wiki_beir(tmp_path / "beir", 30, 8, "dev")
    ev = ["--eval.beir", str(beir), "--eval.every", "1", "--eval.max_docs", "20", "--eval.keep_best", "mrr@10"]
    one, two = tmp_path / "one", tmp_path / "two"
    f64 = ["--run.dtype", "float64"]  # algebra: float64 on both sides, so ALGEBRA_RTOL (tests/errmodel.py)
    _run([*COMMON, *f64, *ev, "--data.queries", "4", "--run.steps", "4", "--run.out_dir", str(one)])
    _run([*COMMON, *f64, *ev, "--data.queries", "2", "--run.steps", "4", "--run.out_dir", str(two)], nproc=2)
    (a, ea), (b, eb) = ([[m for m in _metrics(run) if ("eval" in m) == e] for e in (False, True)] for run in (one, two))
    assert [m["step"] for m in a] == [m["step"] for m in b] == [m["step"] for m in ea] == [m["step"] for m in eb] \
        == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["queries"] == y["queries"] == 4 and x["passages"] == y["passages"] == 12
        for k in ("loss", "accuracy", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=ALGEBRA_RTOL, abs=0), (x["step"], k)
    for x, y in zip(ea, eb):
        # the embeddings agree to ~ALGEBRA_RTOL, so the rankings are the same and the metrics equal (up
        # to their own float sums); a swapped rank moves a metric of 8 queries by far more
        for k in ("ndcg@10", "mrr@10", "recall@100", "documents", "queries"):
            assert x["eval"][k] == pytest.approx(y["eval"][k], rel=ALGEBRA_RTOL, abs=1e-12), (x["step"], k)
    best = [json.loads((run / "best" / "best.json").read_text()) for run in (one, two)]
    assert best[0]["step"] == best[1]["step"] and best[0]["metric"] == "mrr@10"
    # without cross-rank sharing each query sees only its rank's 6 passages: a different loss
    local = tmp_path / "local"
    _run([*COMMON, *f64, "--data.queries", "2", "--run.steps", "1", "--run.out_dir", str(local),
          "--contrastive.cross_rank", "false"], nproc=2)
    assert abs(_metrics(local)[0]["loss"] - a[0]["loss"]) > 1e-3


def test_resume_after_kill_is_exact(tmp_path):
    """The resumed run equals the unstopped one bit for bit (the same computation in the same order:
    SAME_ORDER)."""
    args = [*COMMON, "--run.steps", "5", "--run.ckpt_every", "2"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    _run([*args, "--run.out_dir", str(full)], env=SAME_ORDER)
    p = _run([*args, "--run.out_dir", str(crashed)], hooks=("--crash-at", "3"), check=False, env=SAME_ORDER)
    assert p.returncode == -9
    assert sorted(c.name for c in (crashed / "checkpoints").iterdir())[-1] == "step_0000002"
    _run([*args, "--run.out_dir", str(crashed), "--run.resume", "true"], env=SAME_ORDER)
    want = {m["step"]: m for m in _metrics(full)}
    got = _metrics(crashed)
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5]  # step 3 re-run after the crash, its first row dropped
    for m in got[2:]:
        for k in ("loss", "accuracy", "grad_norm", "tokens"):
            assert m[k] == want[m["step"]][k], (m["step"], k)


def test_lora_run_exports_merged_weights(tmp_path):
    """LoRA fine-tuning changes only the adapted matrices; RUN/export (merged) and the training
    checkpoint (merged on load) hold the same weights; the export encodes like the checkpoint."""
    from llara_fast.encode import Encoder
    from llara_fast.io.load import load

    out = tmp_path / "lora"
    _run([*COMMON, "--run.steps", "2", "--run.out_dir", str(out), "--lora.rank", "4", "--lora.targets", "wq,w2",
          "--run.export", "true"])
    ck, _, _ = load(str(out / "checkpoints" / "step_0000002"))
    ex, tok, prompts = load(str(out / "export"))
    base, _, _ = load("debug")
    sc, se, sb = ck.state_dict(), ex.state_dict(), base.state_dict()
    assert sorted(sc) == sorted(se) == sorted(sb)
    for k in sb:
        torch.testing.assert_close(se[k], sc[k], atol=0, rtol=0)  # one merge, saved losslessly
        changed = not torch.equal(sc[k], sb[k])
        assert changed == (k.endswith("attention.wq.weight") or k.endswith("feed_forward.w2.weight")), k
    texts = ["a short passage", "another one about cats"]
    a = Encoder(ck, tok, prompts).encode_passages(texts)
    b = Encoder.from_pretrained(str(out / "export")).encode_passages(texts)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # the same weights through the same code


def test_bad_records_are_skipped_and_counted(tmp_path):
    good = [{"query": f"q{i}", "pos": [f"passage {i} text"], "neg": [f"other {i}", f"more {i}"]} for i in range(6)]
    lines = [json.dumps(r) for r in good] + [
        json.dumps({"query": "", "pos": ["x"]}), json.dumps({"pos": ["x"]}), json.dumps({"query": "q", "pos": []}),
        "{not json"]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    p = _run([*COMMON, "--data.train", str(data), "--run.steps", "1", "--run.out_dir", str(tmp_path / "r")])
    log = p.stdout + p.stderr
    assert "6 training queries" in log
    for reason in ("empty_query", "missing_field:query", "no_positive", "invalid_json"):
        assert f"'{reason}': 1" in log, reason
    # mostly bad: a clear error naming the file and line
    data.write_text("\n".join(lines[:1] + lines[6:]) + "\n")
    p = _run([*COMMON, "--data.train", str(data), "--run.steps", "1", "--run.out_dir", str(tmp_path / "s")],
             check=False)
    assert p.returncode == 1 and f"{data}:2" in p.stderr, p.stderr[-2000:]
    p = _run([*COMMON, "--data.train", str(data), "--data.beir", str(tmp_path), "--run.steps", "1", "--run.out_dir",
              str(tmp_path / "t")], check=False)
    assert p.returncode == 2 and "not both" in p.stderr


def test_model_tokenizer_and_checkpoint_sources(tmp_path):
    """`model.tokenizer` is honoured (a preset without weights over the SentencePiece tokenizer:
    the export carries it); a training checkpoint brings its own tokenizer, so giving one is
    refused; `model.layers` cuts a checkpoint source too."""
    from llara_fast.data.sources import sentencepiece_model_path
    from llara_fast.io.load import load

    spm = str(sentencepiece_model_path())
    out = tmp_path / "spm"
    _run([*COMMON, "--model.tokenizer", spm, "--run.steps", "1", "--run.out_dir", str(out), "--run.export", "true"])
    _, tok, _ = load(str(out / "export"))
    assert len(tok) == 32016 and tok.convert_tokens_to_ids("<s1>") == 32000
    ck = str(out / "checkpoints" / "step_0000001")
    p = _run([*COMMON, "--model.name", ck, "--model.tokenizer", spm, "--run.steps", "1",
              "--run.out_dir", str(tmp_path / "x")], check=False)
    assert p.returncode == 1 and "brings its own weights and tokenizer" in p.stderr, p.stderr[-2000:]
    model, tok2, _ = load(ck, layers=1)
    assert model.args.n_layers == len(model.layers) == 1 and len(tok2) == 32016


def test_loader_is_rank_independent_and_tops_up_negatives():
    """The global step's groups are the same for 1 and 2 ranks; a query with too few negatives
    is topped up with other queries' positives, never its own."""
    from conftest import toy_template

    from llara_fast.data.loader import ContrastiveLoader, GroupSpec

    recs = [([i + 1], [[100 + i]], [[200 + i]] if i % 2 else []) for i in range(5)]
    tpl = toy_template(300)

    def groups(loader):
        out = []
        for mb in next(loader):
            ids = mb.batch.input_ids.tolist()
            cu = mb.batch.cu_seqlens_q.tolist()
            texts = [ids[a + len(tpl.prefix_ids)] for a in cu[:-1]]  # first text token of each segment
            q = mb.n_queries
            out += [(texts[j], texts[q + j * mb.group:q + (j + 1) * mb.group]) for j in range(q)]
        return out

    one = ContrastiveLoader(recs, tpl, GroupSpec(queries=4, negatives=2, seed=3))
    r0 = ContrastiveLoader(recs, tpl, GroupSpec(queries=2, negatives=2, seed=3), dp_rank=0, dp_world=2)
    r1 = ContrastiveLoader(recs, tpl, GroupSpec(queries=2, negatives=2, seed=3), dp_rank=1, dp_world=2)
    for _ in range(3):  # crosses an epoch boundary (5 records, 4 queries per step)
        g1 = groups(one)
        assert g1 == groups(r0) + groups(r1)
        for q, (pos, *negs) in g1:
            assert pos == 99 + q and len(negs) == 2 and pos not in negs
    state = one.state_dict()
    want = groups(one)
    again = ContrastiveLoader(recs, tpl, GroupSpec(queries=4, negatives=2, seed=3))
    again.load_state_dict(state)
    assert groups(again) == want
    with pytest.raises(ValueError, match="lower data.negatives"):
        next(ContrastiveLoader(recs[:1], tpl, GroupSpec(queries=1, negatives=2)))
