"""The LLaRA objective against a direct transcription of the reference recipe on a real
SmolLM2-135M batch: HF transformers, each example alone with the dense 4-D mask, logits at every
position, max over the 8 rows, log_softmax, mean over unique targets, /10, plus the shifted LM CE.
The algebra (model, loss, every parameter gradient) is checked in float64 on both sides; the
loss implementations in fp32 run against a float64 truth under the worst-case rounding bounds of
tests/errmodel.py, so the tests hold on any CPU's BLAS and any summation order."""
import copy

import numpy as np
import pytest
import torch
from conftest import INTERPRETED, hf_reference_model, random_examples, reference_layout, toy_template
from errmodel import (
    ALGEBRA_RTOL,
    assert_within,
    gamma,
    logit_error,
    pooled_tie_tol,
    softmax_rel_error,
    unit_roundoff,
    xent_grad_tol,
    xent_loss_tol,
)

from llara_fast.batch import Example
from llara_fast.config import ModelArgs
from llara_fast.data.packing import pack_reference
from llara_fast.io.hf import ours_to_hf
from llara_fast.kernels.linear_xent import linear_xent
from llara_fast.kernels.reference import bow_xent_reference
from llara_fast.model import Transformer
from llara_fast.objectives.llara import LossConfig, llara_loss


def reference_objective(logits_of, template, examples, w_lm=1.0, pooling="max", lse_only=False):
    """The released recipe, transcribed: logits_of(e) gives example e's logits at every position
    (BOS " TEXT SUM PRED layout, fp32 or float64); returns (total, lm, ebae, ebar).
    lse_only: every cross-entropy keeps only its log-sum-exp (the softmax part of the gradient)."""
    P, S = len(template.prefix_ids), len(template.sum_ids)
    lm_terms, ebae, ebar = [], [], []
    for e, ex in enumerate(examples):
        logits = logits_of(e)  # (L, V)
        T = len(ex.text_ids)
        # shifted LM CE: position P-1+j predicts text[j]
        rows = logits[P - 1:P - 1 + T]  # (T, V)
        lm_terms.append(torch.logsumexp(rows, -1).sum() if lse_only else torch.nn.functional.cross_entropy(
            rows, torch.as_tensor(ex.text_ids), reduction="sum"))
        for offs, base, targets, out in ((template.sum_special_offsets, P + T, ex.sum_targets, ebae),
                                         (template.pred_special_offsets, P + T + S, ex.pred_targets, ebar)):
            rows = logits[[base + o for o in offs]]  # (8, V)
            z = rows.max(dim=0).values if pooling == "max" else rows.mean(dim=0)  # (V,)
            uniq = sorted(set(int(t) for t in targets))
            if uniq:
                out.append(torch.logsumexp(z, -1) if lse_only else -torch.log_softmax(z, -1)[uniq].mean())
    n_text = sum(len(ex.text_ids) for ex in examples)
    lm = torch.stack(lm_terms).sum() / n_text
    ebae_m, ebar_m = torch.stack(ebae).mean(), torch.stack(ebar).mean()
    total = w_lm * lm + (ebae_m / 10 + ebar_m / 10) / 2
    return total, lm, ebae_m, ebar_m


def _logits(hidden, head):
    """Every position's logits, fp32 (float64 for float64 inputs), as the reference materialises them."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    return hidden.to(acc) @ head.to(acc).t()  # (L, V)


def llara_tols(h, w, z, G, P, batch, pooling):
    """Worst-case fp32 bounds for llara_loss on hidden h (N, d) and head w (V, d): (tol dL/dh,
    tol dL/dw, tol of (total, lm, ebae, ebar)). z (N, V) the float64 logits, G and P (N, V) the
    float64 dL/dz and its softmax part (tests/errmodel.py)."""
    dz = logit_error(h, w)  # (N, 1)
    e = torch.zeros_like(dz)
    lm_rows = batch.lm_positions
    e[lm_rows] = softmax_rel_error(z[lm_rows], dz[lm_rows])
    lm_tol = xent_loss_tol(z[lm_rows], dz[lm_rows], 1)  # (n_text,)
    rows_ce = torch.logsumexp(z[lm_rows], -1) - z[lm_rows, batch.lm_targets]
    part_tols = [lm_tol.mean() + gamma(len(lm_rows)) * rows_ce.abs().mean()]
    pooled = []
    for pos, offs, ids in ((batch.sum_positions, batch.sum_offsets, batch.sum_ids),
                           (batch.pred_positions, batch.pred_offsets, batch.pred_ids)):
        zg = z[pos]  # (E, K, V)
        zp = zg.max(1).values if pooling == "max" else zg.mean(1)  # (E, V)
        dzp = dz[pos].amax(1)  # (E, 1)
        e[pos] = softmax_rel_error(zp, dzp)[:, None, :].expand(-1, pos.shape[1], -1)
        sets = [sorted(set(ids[offs[i]:offs[i + 1]].tolist())) for i in range(len(offs) - 1)]
        valid = [i for i, t in enumerate(sets) if t]
        tols = torch.stack([xent_loss_tol(zp[i:i + 1], dzp[i:i + 1], len(sets[i]))[0] for i in valid])
        losses = torch.stack([torch.logsumexp(zp[i], -1) - zp[i, sets[i]].mean() for i in valid])
        part_tols.append(tols.mean() + gamma(len(valid)) * losses.abs().mean())
        pooled.append(pos)
    tol_h, tol_w = xent_grad_tol(h, w, G, P, e)
    if pooling == "max":
        for pos in pooled:
            th, tw = pooled_tie_tol(h.double(), w.double(), z, G, P, e, pos, dz)
            tol_h, tol_w = tol_h + th, tol_w + tw
    lm_t, ebae_t, ebar_t = part_tols
    total_t = lm_t + 0.1 * (ebae_t + ebar_t) / 2 + 8 * unit_roundoff(torch.float32) * (
        rows_ce.abs().mean() + 1.0)  # the weighted sum of three fp32 parts
    return tol_h, tol_w, (total_t, lm_t, ebae_t, ebar_t)


def _check(model, tpl, exs, impl, pooling="max"):
    """1) the loss alone on our fp32 hidden states: in float64, llara_loss's composition
       (positions, CSR targets, normalisation) against the transcription, tightly; then `impl` in
       fp32 against that float64 truth, its value and gradients within the worst-case bounds;
    2) end to end in float64 against the transcription on HF transformers: the loss, its parts
       and every parameter gradient, within ALGEBRA_RTOL."""
    cfg = LossConfig(impl=impl, pooling=pooling)
    batch = pack_reference(exs, tpl, 10**9)
    cu = batch.cu_seqlens_q.tolist()
    with torch.no_grad():
        hidden = model(batch)  # (N, d) fp32

    # 1) the loss alone, on our hidden states
    h64 = hidden.detach().double().requires_grad_()
    w64 = model.lm_head_weight.detach().double().requires_grad_()
    z64 = _logits(h64, w64).detach().requires_grad_()  # (N, V) the float64 truth's logits
    want = reference_objective(lambda e: z64[cu[2 * e]:cu[2 * e + 2]], tpl, exs, pooling=pooling)
    G, = torch.autograd.grad(want[0], z64)  # (N, V) dL/dz
    zl = z64.detach().requires_grad_()
    P, = torch.autograd.grad(reference_objective(lambda e: zl[cu[2 * e]:cu[2 * e + 2]], tpl, exs,
                                                 pooling=pooling, lse_only=True)[0], zl)  # (N, V) softmax part
    rh, rw = G @ w64.detach(), G.t() @ h64.detach()  # exact gradients
    exact = llara_loss(h64, batch, w64, LossConfig(impl="reference", pooling=pooling))
    eh, ew = torch.autograd.grad(exact.total, (h64, w64))
    for got, ref in ((exact.total, want[0]), (exact.lm, want[1]), (exact.ebae, want[2]), (exact.ebar, want[3])):
        torch.testing.assert_close(got, ref.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(eh, rh, rtol=1e-10, atol=1e-12 * rh.abs().max().item())
    torch.testing.assert_close(ew, rw, rtol=1e-10, atol=1e-12 * rw.abs().max().item())

    h = hidden.detach().clone().requires_grad_()
    w = model.lm_head_weight.detach().clone().requires_grad_()
    out = llara_loss(h, batch, w, cfg)
    gh, gw = torch.autograd.grad(out.total, (h, w))
    tol_h, tol_w, loss_tols = llara_tols(h.detach(), w.detach(), z64.detach(), G, P, batch, pooling)
    for name, got, ref, tol in zip(("total", "lm", "ebae", "ebar"), (out.total, out.lm, out.ebae, out.ebar),
                                   want, loss_tols):
        assert_within(got, ref.detach(), tol, f"{impl}: {name}")
    assert_within(gh, rh, tol_h, f"{impl}: dL/dhidden")
    assert_within(gw, rw, tol_w, f"{impl}: dL/dhead")

    # 2) end to end in float64 against transformers
    m64 = copy.deepcopy(model).double()
    m64.zero_grad(set_to_none=True)
    out = llara_loss(m64(batch), batch, m64.lm_head_weight, LossConfig(impl="reference", pooling=pooling))
    out.total.backward()
    ref = hf_reference_model(m64)
    head = ref.embed_tokens.weight if m64.output is None else torch.nn.Parameter(
        m64.lm_head_weight.detach().clone())

    def hf_logits(e):
        ids, pos, mask = reference_layout(tpl, exs[e].text_ids)
        return _logits(ref(input_ids=ids, position_ids=pos, attention_mask=mask.double()).last_hidden_state[0], head)

    total, lm, ebae, ebar = reference_objective(hf_logits, tpl, exs, pooling=pooling)
    total.backward()
    for got, want in ((out.total, total), (out.lm, lm), (out.ebae, ebae), (out.ebar, ebar)):
        torch.testing.assert_close(got, want.detach(), rtol=ALGEBRA_RTOL, atol=0)
    ref_grads = dict(ref.named_parameters())
    ours = ours_to_hf({k: p.grad for k, p in m64.named_parameters()})
    for k, g in ours.items():
        want = head.grad if k == "lm_head.weight" else ref_grads[k.removeprefix("model.")].grad
        rel = ((g - want).norm() / want.norm().clamp(min=1e-300)).item()
        assert rel <= ALGEBRA_RTOL, f"{k}: relative grad error {rel}"


def test_tiny_untied_all_impls():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=120, ffn_hidden=40)
    model = Transformer(args, attn_backend="sdpa")
    model.init_weights(std=0.2, seed=0)
    tpl = toy_template(120)
    exs = random_examples(np.random.default_rng(0), [12, 3, 25], 120, n_targets=(1, 15))
    for impl in ("reference", "torch") + (("triton",) if INTERPRETED else ()):  # CPU tensors: interpreted kernels
        for pooling in ("max", "mean"):
            _check(model, tpl, exs, impl, pooling=pooling)


def test_smollm2_batch(smollm2):
    from llara_fast.data.sources import iter_wiki_sample

    model, tok, tpl = smollm2
    texts = [t for _, t in iter_wiki_sample()]
    exs = []
    for i in (10, 11, 12):
        ids = tok(texts[i], add_special_tokens=False)["input_ids"][:40 + 15 * (i - 10)]
        nxt = tok(texts[i + 1], add_special_tokens=False)["input_ids"][:60]
        exs.append(Example(np.array(ids), np.array(tpl.target_set(ids)), np.array(tpl.target_set(nxt))))
    _check(model, tpl, exs, "torch")


def test_weights_and_empty_sets():
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=60, ffn_hidden=24)
    model = Transformer(args, attn_backend="sdpa")
    model.init_weights(seed=1)
    model.double()  # algebra: the same loss from two packings, exactly up to float64 rounding
    tpl = toy_template(60)
    exs = random_examples(np.random.default_rng(1), [5, 7], 60, n_targets=(1, 8))
    exs[1].sum_targets = exs[1].sum_targets[:0]  # an empty EBAE set contributes nothing
    b = pack_reference(exs, tpl, 100)
    h = model(b)
    full = llara_loss(h, b, model.lm_head_weight, LossConfig(impl="reference"))
    assert full.n_ebae.item() == 1 and full.n_ebar.item() == 2
    only0 = llara_loss(h[:b.cu_seqlens_q[2]], pack_reference(exs[:1], tpl, 100), model.lm_head_weight,
                       LossConfig(impl="reference"))
    torch.testing.assert_close(full.ebae, only0.ebae)
    no_lm = llara_loss(h, b, model.lm_head_weight, LossConfig(w_lm=0.0, w_bow=1.0, impl="reference"))
    torch.testing.assert_close(no_lm.total, (full.ebae + full.ebar) / 2)
    assert no_lm.lm.item() == 0.0
    with pytest.raises(ValueError, match="loss impl"):
        LossConfig(impl="cuda")


@pytest.mark.parametrize("tasks", ["ebae", "ebar"])
def test_single_task_ablation(tasks):
    """loss.tasks = ebae or ebar: the total is w_lm·LM + w_bow·(that task), its gradient is that
    expression's, and the other task is logged with the value it has in the full objective."""
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=60, ffn_hidden=24)
    model = Transformer(args, attn_backend="sdpa")
    model.init_weights(seed=3)
    tpl = toy_template(60)
    b = pack_reference(random_examples(np.random.default_rng(3), [6, 9], 60, n_targets=(1, 8)), tpl, 100)
    h = model(b).detach().double().requires_grad_(True)
    w = model.lm_head_weight.detach().double().requires_grad_(True)
    full = llara_loss(h, b, w, LossConfig(impl="reference"))
    one = llara_loss(h, b, w, LossConfig(impl="reference", tasks=tasks))
    kept = full.ebae if tasks == "ebae" else full.ebar
    torch.testing.assert_close(one.total, full.lm + 0.1 * kept, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.stack([one.ebae, one.ebar]), torch.stack([full.ebae, full.ebar]), rtol=0, atol=0)
    g_one = torch.autograd.grad(one.total, (h, w))
    pos, offs, ids = ((b.sum_positions, b.sum_offsets, b.sum_ids) if tasks == "ebae"
                      else (b.pred_positions, b.pred_offsets, b.pred_ids))
    per_ex, valid = bow_xent_reference(h[pos], w, offs, ids, "max")  # (E,), (E,)
    expect = llara_loss(h, b, w, LossConfig(impl="reference", w_bow=0.0)).total + 0.1 * (per_ex * valid).sum() / valid.sum()
    for a, e in zip(g_one, torch.autograd.grad(expect, (h, w))):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-15)
    # the dropped task's special rows get no gradient at all
    dropped = b.pred_positions if tasks == "ebae" else b.sum_positions
    assert g_one[0][dropped].abs().max() == 0 and g_one[0][pos].abs().max() > 0
    with pytest.raises(ValueError, match="loss tasks"):
        LossConfig(tasks="ebae+ebar")


def test_train_step_rejects_out_of_vocab_ids():
    from llara_fast.objectives.llara import LlaraObjective, LlaraTrainModule
    from llara_fast.train.step import build_optimizer, optimizer_step

    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=60, ffn_hidden=24)
    model = Transformer(args, attn_backend="sdpa")
    model.init_weights(seed=2)
    tpl = toy_template(60)
    b = pack_reference(random_examples(np.random.default_rng(2), [5], 60, n_targets=(1, 5)), tpl, 100)
    b.sum_ids[0] = 60
    module = LlaraTrainModule(model, LossConfig())
    with pytest.raises(ValueError, match="sum_ids holds id 60, outside the model's vocabulary"):
        optimizer_step(module, [b], build_optimizer(module, 1e-3, 0.0), None, LlaraObjective(60),
                       device=torch.device("cpu"))


def test_lm_chunk_rows(monkeypatch):
    """loss.lm_chunk_rows only re-chunks the fused LM loss: the same value to fp32 rounding (each
    row's loss is computed alone; only the GEMM's blocking may differ with the chunk's rows)."""
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=60, ffn_hidden=24)
    model = Transformer(args, attn_backend="sdpa")
    model.init_weights(seed=4)
    b = pack_reference(random_examples(np.random.default_rng(4), [30, 41], 60, n_targets=(1, 8)), toy_template(60), 200)
    h = model(b).detach()
    w = model.lm_head_weight.detach()
    import llara_fast.objectives.llara as obj
    seen = []
    monkeypatch.setattr(obj, "linear_xent", lambda *a, **k: seen.append(a[3]) or linear_xent(*a, **k))
    whole = llara_loss(h, b, w, LossConfig(impl="torch"))
    chunked = llara_loss(h, b, w, LossConfig(impl="torch", lm_chunk_rows=16))
    assert seen == [None, 16] and b.lm_positions.numel() > 32  # several chunks
    # both within the worst-case bound of the float64 truth, so within twice it of each other
    z = h.double() @ w.double().t()  # (N, V)
    rows = b.lm_positions
    ce = torch.logsumexp(z[rows], -1) - z[rows, b.lm_targets]
    tol = xent_loss_tol(z[rows], logit_error(h[rows], w), 1).mean() + gamma(len(rows)) * ce.abs().mean()
    for got in (whole.lm, chunked.lm):
        assert_within(got, ce.mean(), tol, "lm")
    assert_within(chunked.lm, whole.lm, 2 * tol, "chunked vs whole")
    with pytest.raises(ValueError, match="lm_chunk_rows"):
        LossConfig(lm_chunk_rows=-1)
