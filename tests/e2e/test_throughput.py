"""benchmarks/reference_llara.py (the reference baseline) and benchmarks/throughput.py.

The baseline must train the same objective as llara_fast: same weights and examples give the
same loss and gradients (float64 on both sides: algebra, agreement to that format's rounding;
and fp32 on the real model, the benchmark's own setting), its padded layout is DESIGN §1's
layout per example, and the benchmark runs end to end and prints its JSON line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _float64_norms_and_rope, random_examples, reference_layout, toy_template
from errmodel import ALGEBRA_RTOL

from llara_fast.config import ModelArgs
from llara_fast.data.packing import pack_reference
from llara_fast.io.hf import ours_to_hf
from llara_fast.model import Transformer
from llara_fast.objectives.llara import LlaraTrainModule, LossConfig

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import reference_llara as ref  # noqa: E402


def _both_losses(model, template, examples, max_len, pad_id=0):
    """(ours (total, lm, ebae, ebar), reference's, ours module, HF model) after one backward each."""
    dtype = model.tok_embeddings.weight.dtype
    # float64: the loss's reference impl (the fused kernels are checked against it in test_*_xent)
    module = LlaraTrainModule(model, LossConfig(impl="reference" if dtype == torch.float64 else "auto"))
    total, parts = module(pack_reference(examples, template, max_len))
    total.backward()
    hf = ref.build_hf_model(model, dtype=dtype)
    if dtype == torch.float64:
        _float64_norms_and_rope(hf.model)
    r = ref.reference_forward(hf, ref.collate(examples, template, max_len, pad_id))
    r[0].backward()
    return torch.cat([total.detach()[None], parts]), torch.stack([x.detach() for x in r]), hf


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_reference_loss_and_grads_equal_ours(tied):
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=120, ffn_hidden=40,
                     tie_embeddings=tied)
    model = Transformer(args, attn_backend="sdpa")
    model.init_weights(std=0.2, seed=0)
    model.double()
    tpl = toy_template(120)
    exs = random_examples(np.random.default_rng(0), [12, 1, 25, 7], 120, n_targets=(1, 15))
    exs[1].sum_targets = exs[1].sum_targets[:0]  # an empty EBAE set: not counted in the mean
    ours, theirs, hf = _both_losses(model, tpl, exs, max_len=20)  # 25 is cut to 20
    torch.testing.assert_close(theirs, ours, rtol=1e-12, atol=0)
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    for k, g in ours_to_hf({k: p.grad for k, p in model.named_parameters()}).items():
        want = hf_grads[k]
        rel = ((g - want).norm() / want.norm()).item()
        assert rel < 1e-10, f"{k}: relative gradient difference {rel}"


def test_collate_is_the_design_layout_left_padded():
    tpl = toy_template(120)
    exs = random_examples(np.random.default_rng(3), [9, 2, 14], 120)
    b = ref.collate(exs, tpl, 12, pad_id=0)
    mask = ref.attention_mask_4d(b)[:, 0]  # (B, L, L)
    L = b.input_ids.shape[1]
    real_pairs = 0
    for i, ex in enumerate(exs):
        ids, pos, add = reference_layout(tpl, ex.text_ids[:12])  # one example alone, DESIGN §1
        o = L - ids.shape[1]  # left pads
        assert int(b.pad[i]) == o and (b.input_ids[i, :o] == 0).all()
        assert torch.equal(b.input_ids[i, o:], ids[0]) and torch.equal(b.position_ids[i, o:], pos[0])
        assert torch.equal(mask[i, o:, o:], add[0, 0] == 0)
        assert not mask[i, o:, :o].any()  # no real token sees a pad
        assert torch.equal(mask[i, :o, :o], torch.eye(o, dtype=torch.bool))  # pad rows: themselves only
        real_pairs += int(mask[i, o:].sum())
    assert b.num_tokens == sum(example_len for example_len in (L - b.pad).tolist())
    # the pairs the dense mask allows are the pairs the FLOP accounting counts for the packed batch
    assert real_pairs == pack_reference(exs, tpl, 12).attn_pairs()


def test_reference_loss_equals_ours_smollm2_wiki(smollm2):
    """The real SmolLM2 weights on wiki passages of different lengths (the reference pads): the
    same loss and parts, in float64 on both sides (algebra, ALGEBRA_RTOL)."""
    import copy

    import throughput

    model32, tok, tpl = smollm2
    model = copy.deepcopy(model32).double()
    exs = throughput.wiki_examples(tok, tpl, 3, max_len=64)
    exs[0].text_ids = exs[0].text_ids[:20]  # different lengths: the reference pads
    exs[2].text_ids = exs[2].text_ids[:41]
    with torch.no_grad():
        total, parts = LlaraTrainModule(model, LossConfig(impl="reference"))(pack_reference(exs, tpl, 64))
        hf = ref.build_hf_model(model, dtype=torch.float64)
        _float64_norms_and_rope(hf.model)
        theirs = torch.stack(ref.reference_forward(hf.eval(), ref.collate(exs, tpl, 64, tok.pad_token_id)))
    del hf
    torch.testing.assert_close(theirs, torch.cat([total[None], parts]), rtol=ALGEBRA_RTOL, atol=0)


def test_master_weight_adamw_step():
    """The DeepSpeed-style bf16 reference: bf16 module, AdamW on fp32 masters, module refreshed from them."""
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=120, ffn_hidden=40, tie_embeddings=True)
    model = Transformer(args, attn_backend="sdpa")
    model.init_weights(std=0.2, seed=2)
    tpl = toy_template(120)
    exs = random_examples(np.random.default_rng(2), [6, 11], 120, n_targets=(1, 9))
    hf = ref.build_hf_model(model).to(torch.bfloat16)
    opt = ref.MasterWeightAdamW(hf, lr=1e-2)
    before = [m.clone() for m in opt.master]
    out = ref.reference_step(hf, ref.collate(exs, tpl, 16, 0), opt, device=torch.device("cpu"), grad_clip=1.0)
    assert np.isfinite(out["loss"]) and out["grad_norm"] > 0
    assert all(m.dtype == torch.float32 and m.grad is None for m in opt.master)
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in opt.params)
    assert any(not torch.equal(m, b) for m, b in zip(opt.master, before))
    for p, m in zip(opt.params, opt.master):
        assert torch.equal(p, m.to(torch.bfloat16))


def test_throughput_cli_debug():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--model", "debug", "--impl", "both",
           "--steps", "1", "--warmup", "1", "--passages-per-step", "3", "--max-len", "32", "--dtype", "fp64"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    rec = json.loads(lines[-1])
    assert "ours / reference, passages/s" in r.stdout and " - " in r.stdout  # MFU '-' without a GPU peak
    ours, theirs = rec["results"]["ours"], rec["results"]["reference"]
    assert rec["ratio_passages_per_s"] == pytest.approx(ours["passages_per_s"] / theirs["passages_per_s"])
    assert rec["passages_per_step"] == 3 and rec["micro_batches_ours"] == 1
    for res in (ours, theirs):
        assert res["mfu_ours"] is None and res["mfu_titan"] is None and res["passages_per_s"] > 0
        assert res["peak_mib"] is None or res["peak_mib"] > 0
    # identical weights and passages, both sides in float64 (algebra): the same loss on the first
    # step and, after one AdamW update, on the second; and the same model FLOPs
    for k in ("first_loss", "last_loss"):
        np.testing.assert_allclose(theirs[k], ours[k], rtol=ALGEBRA_RTOL, atol=0, err_msg=k)
    assert ours["tflops_ours"] / theirs["tflops_ours"] == pytest.approx(rec["ratio_passages_per_s"])
    acct = rec["step_accounting"]
    args = ModelArgs.from_preset("debug", vocab_size=rec["vocab"])
    assert acct["flops_ours"] == args.step_flops(acct["tokens"], acct["attn_pairs"], acct["head_positions"])
