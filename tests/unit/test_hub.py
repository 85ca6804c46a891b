"""Hub model ids (issue 27.1): ORG/NAME wherever a model or tokenizer is named resolves to its
snapshot in the HF cache (HF_HOME), offline under HF_HUB_OFFLINE; a run records the commit it
resolved; failures are one line. The jobs run in this process (main(argv)) on tiny_hub's model."""
import gc
import json
import shutil

import httpx2
import pytest
import tomllib
import torch
from conftest import HUB_ID, hub_snapshot_dir, write_wiki_beir

from llara_fast.encode import Encoder
from llara_fast.errors import InputNotFound, UserError
from llara_fast.io.hf import hub_commit, is_hub_id, resolve_source
from llara_fast.io.load import load

TEXTS = ["The llama is a domesticated South American camelid.", "Paris is the capital of France."]


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1, err
    return lines[0]


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "here").mkdir()
    assert is_hub_id("BAAI/LLARA-pretrain") and is_hub_id("gpt2")
    for spec in ("smollm2-135m", "debug", "org/here", "x.gguf", "a/b/c", "/abs/path", "./rel", "../up/x", "a--b/c"):
        assert not is_hub_id(spec), spec


def test_hub_id_resolves_offline_to_the_cached_snapshot(offline_hub):
    _, snap, sha = offline_hub
    assert resolve_source(HUB_ID) == snap and hub_commit(snap) == sha
    assert resolve_source(HUB_ID, sha) == snap  # a commit resolves without refs/
    by_id = Encoder.from_pretrained(HUB_ID, attn_backend="sdpa", device="cpu")
    by_dir = Encoder.from_pretrained(str(snap), attn_backend="sdpa", device="cpu")
    torch.testing.assert_close(by_id.encode_passages(TEXTS), by_dir.encode_passages(TEXTS), rtol=0, atol=0)


def test_offline_without_the_model_and_unknown_revision_are_one_line(offline_hub, capsys):
    from llara_fast.encode import main as encode_main

    hf_home = offline_hub[0]
    with pytest.raises(InputNotFound, match=rf"nobody/nothing: not a local path, and as a Hub model id it is not in "
                                            rf"the HF cache at {hf_home / 'hub'}; HF_HUB_OFFLINE is set"):
        load("nobody/nothing")
    assert encode_main(["--model", "nobody/nothing", "--text", "a"]) == 2
    assert "unset it to download" in one_line(capsys.readouterr().err)
    with pytest.raises(UserError, match="did you mean the preset smollm2-135m"):
        load("smollm2-135")  # a mistyped preset reads as a Hub id
    assert encode_main(["--model", HUB_ID, "--revision", "nope", "--text", "a"]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{HUB_ID}: not a local path, and as a Hub model id it is in the HF cache at" in line
    assert "but not at revision 'nope' (cached: main)" in line


def test_online_failures_are_one_line(offline_hub, monkeypatch):
    """Repository not found and gated repositories (the Hub's answers, faked here: no network)."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    for error, msg in ((RepositoryNotFoundError, "no Hub model of that id"), (GatedRepoError, "a gated Hub model")):
        def fake(*a, error=error, **kw):
            assert kw["local_files_only"] is False  # online: downloads allowed
            raise error("404 Client Error", response=response)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
        with pytest.raises(UserError, match=msg) as e:
            load("someone/missing")
        assert "\n" not in str(e.value)


def test_a_repo_with_only_pytorch_bin_weights(offline_hub, tmp_path):
    """Older repos ship pytorch_model.bin only: fetched (no safetensors) and read tensors-only."""
    from safetensors.torch import load_file

    hf_home, snap, _ = offline_hub
    files = tmp_path / "files"
    shutil.copytree(snap, files)
    torch.save(load_file(files / "model.safetensors"), files / "pytorch_model.bin")
    (files / "model.safetensors").unlink()
    hub_snapshot_dir(hf_home, "llara-test/bin-only", files, "b" * 40)
    a, _, _ = load("llara-test/bin-only")
    b, _, _ = load(str(snap))
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)


@pytest.mark.e2e  # whole training runs (in this process): the e2e tier
def test_pretrain_and_finetune_on_a_hub_id_record_its_commit(offline_hub, in_process_group, tmp_path):
    """pretrain (2 steps) on the id writes name = the id and revision = the commit into config.toml;
    the resume loads that commit even after refs/main moved; finetune on the id exports with the
    commit in llara_fast.json and the card."""
    from llara_fast.finetune import main as finetune_main
    from llara_fast.io.export import main as export_main
    from llara_fast.pretrain import main as pretrain_main

    hf_home, snap, sha = offline_hub
    run = tmp_path / "pre"
    common = ["--model.name", HUB_ID, "--run.out_dir", str(run), "--data.limit", "24", "--data.max_len", "48"]
    assert pretrain_main([*common, "--run.steps", "2"]) == 0
    model_cfg = tomllib.loads((run / "config.toml").read_text())["model"]
    assert (model_cfg["name"], model_cfg["revision"]) == (HUB_ID, sha)
    (hf_home / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "refs" / "main").write_text("c" * 40)
    gc.collect()  # the finished run's Trainer, and so its lock on the run directory
    assert pretrain_main(["--run.out_dir", str(run), "--run.resume", "true", "--run.steps", "3"]) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    (hf_home / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "refs" / "main").write_text(sha)
    # a run directory exports its newest complete checkpoint (not "RUN/config.json missing")
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "exp")]) == 0
    assert json.loads((tmp_path / "exp" / "llara_fast.json").read_text())["source"] == str(
        run / "checkpoints" / "step_0000003")

    ft = tmp_path / "ft"
    assert finetune_main(["--model.name", HUB_ID, "--run.out_dir", str(ft), "--run.steps", "1", "--data.queries", "2",
                          "--data.negatives", "1", "--data.limit", "8"]) == 0
    meta = json.loads((ft / "export" / "llara_fast.json").read_text())
    assert (meta["source"], meta["source_revision"]) == (f"{HUB_ID} + llara_fast.finetune", sha)
    assert f"(Hub commit `{sha}`)" in (ft / "export" / "README.md").read_text()


def test_encode_evaluate_mine_export_prepare_on_a_hub_id(offline_hub, tmp_path, capsys):
    from llara_fast.data.prepare import main as prepare_main
    from llara_fast.encode import main as encode_main
    from llara_fast.evaluate import main as evaluate_main
    from llara_fast.io.export import main as export_main
    from llara_fast.mine import main as mine_main

    _, snap, sha = offline_hub
    ds = write_wiki_beir(tmp_path / "ds", 12, 4)
    assert not encode_main(["--model", HUB_ID, "--text", "a llama", "--attn", "sdpa"])  # None: done
    assert f"({HUB_ID}, mean of" in capsys.readouterr().out
    assert evaluate_main(["--model", HUB_ID, "--beir", str(ds), "--quiet", "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["model"] == HUB_ID
    assert mine_main(["--beir", str(ds), "--split", "test", "--model", HUB_ID, "--k", "2", "--quiet", "--out",
                      str(tmp_path / "mined.jsonl")]) == 0
    assert export_main(["--checkpoint", HUB_ID, "--out", str(tmp_path / "exp"), "--dtype", "bf16"]) == 0
    meta = json.loads((tmp_path / "exp" / "llara_fast.json").read_text())
    assert (meta["source"], meta["source_revision"], meta["dtype"]) == (HUB_ID, sha, "bfloat16")
    assert f"from `{HUB_ID}` (Hub commit `{sha}`)" in (tmp_path / "exp" / "README.md").read_text()
    assert prepare_main(["--tokenizer", HUB_ID, "--format", "wiki-sample", "--max-len", "48", "--limit", "8",
                         "--workers", "1", "--no-progress", "--out", str(tmp_path / "data")]) == 0
    tok = json.loads((tmp_path / "data" / "manifest.json").read_text())["tokenizer"]
    assert tok["hub_commit"] == sha and tok["spec"] == HUB_ID


@pytest.mark.e2e
def test_real_smollm2_from_a_hub_cache(tmp_path, monkeypatch):
    """The shipped SmolLM2 laid out as a Hub cache (symlinked files) encodes exactly as the preset."""
    src = resolve_source("smollm2-135m")
    hub_snapshot_dir(tmp_path / "hf_home", "HuggingFaceTB/SmolLM2-135M-Instruct", src, "d" * 40, link=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_id = Encoder.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", attn_backend="sdpa", device="cpu")
    preset = Encoder.from_pretrained("smollm2-135m", attn_backend="sdpa", device="cpu")
    torch.testing.assert_close(by_id.encode_queries(TEXTS), preset.encode_queries(TEXTS), rtol=0, atol=0)
