"""The contrastive objective against a plain transcription: HF transformers' LlamaModel on a
dense, right-padded batch, an explicit query x passage similarity matrix, cross-entropy. Both
sides run in float64 (this checks layout, pooling, the gather and the loss: algebra), so they
agree to that format's rounding."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import hf_reference_model, run_entry, toy_template
from errmodel import ALGEBRA_RTOL

from llara_fast.data.packing import pack_encode_reference
from llara_fast.io.hf import ours_to_hf
from llara_fast.objectives.contrastive import ContrastiveConfig, ContrastiveModule, info_nce, pooled_embeddings

ROOT = Path(__file__).resolve().parents[2]
TEMPERATURE = 0.05
Q_TOTAL, GROUP = 4, 3  # 4 queries, each with 1 positive + 2 negatives


def tiny_model():
    from llara_fast.config import ModelArgs
    from llara_fast.model import Transformer

    args = ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=300, ffn_hidden=96,
                     rope_theta=10000.0, max_seq_len=512, tie_embeddings=True)
    model = Transformer(args, attn_backend="sdpa")
    model.init_weights(std=0.2, seed=3)
    return model.double(), toy_template(300)


def global_batch(template):
    rng = np.random.default_rng(7)
    queries = [rng.integers(2, 280, size=int(n)).tolist() for n in rng.integers(1, 9, Q_TOTAL)]
    passages = [rng.integers(2, 280, size=int(n)).tolist() for n in rng.integers(0, 30, Q_TOTAL * GROUP)]
    return queries, passages


def dense_reference(ref, template, queries, passages, temperature, group):
    """Loss of the transcription: each text one right-padded row, mean of the hidden states at the
    K special positions, explicit (Q, P) similarities, mean cross-entropy over queries."""
    K = template.n_special
    rows, spec = [], []
    for t, kind in [(q, "query") for q in queries] + [(p, "passage") for p in passages]:
        suffix = list(template.pred_ids if kind == "query" else template.sum_ids)
        offs = template.pred_special_offsets if kind == "query" else template.sum_special_offsets
        row = list(template.prefix_ids) + list(t) + suffix
        spec.append([len(row) - len(suffix) + o for o in offs])
        rows.append(row)
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    att = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        att[i, :len(r)] = 1
    hidden = ref(input_ids=ids, attention_mask=att).last_hidden_state  # (R, L, d)
    idx = torch.tensor(spec)  # (R, K)
    emb = hidden[torch.arange(len(rows))[:, None], idx].mean(1)  # (R, d)
    assert idx.shape[1] == K
    emb = emb / emb.norm(dim=-1, keepdim=True)
    q, p = emb[:len(queries)], emb[len(queries):]
    sim = q @ p.t()  # (Q, P) cosine similarities
    target = torch.arange(len(queries)) * group
    return F.cross_entropy(sim / temperature, target)


def _grads_hf(ref):
    return {k: v.grad for k, v in ref.named_parameters()}


def _compare_grads(ours: dict, ref: dict, rel: float):
    ours_hf = {k.removeprefix("model."): v for k, v in ours_to_hf(ours).items() if k != "lm_head.weight"}
    assert set(ours_hf) == set(ref)
    for k, g in ref.items():
        err = (ours_hf[k] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < rel, (k, float(err))


def test_info_nce_matches_explicit_matrix():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 8, generator=g, dtype=torch.float64), dim=-1)  # algebra: float64
    p = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    loss, hits = info_nce(q, p, group=2, temperature=0.1, n_queries=3, cross_rank=False)
    sim = q @ p.t() / 0.1
    want = -sum(torch.log_softmax(sim[i], -1)[2 * i] for i in range(3)) / 3
    torch.testing.assert_close(loss, want, rtol=ALGEBRA_RTOL, atol=0)
    assert int(hits) == sum(int(sim[i].argmax() == 2 * i) for i in range(3))
    with pytest.raises(ValueError, match="groups of 4"):
        info_nce(q, p, group=4, temperature=0.1, n_queries=3)


def test_pooled_embeddings_are_unit_means():
    h = torch.randn(10, 4, dtype=torch.float64)  # algebra: float64
    sp = torch.tensor([[1, 2], [7, 9]])
    e = pooled_embeddings(h, sp)
    torch.testing.assert_close(e[1], F.normalize((h[7] + h[9]) / 2, dim=0), rtol=ALGEBRA_RTOL, atol=0)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2, dtype=torch.float64), rtol=ALGEBRA_RTOL, atol=0)


def test_loss_and_grads_match_hf_transcription_real_model(smollm2):
    """Real SmolLM2-135M weights (first 2 blocks), real text: one packed forward of queries and
    passages vs HF's padded forward; loss and every parameter gradient."""
    import copy
    from itertools import islice

    from llara_fast.data.sources import iter_wiki_sample

    model0, tok, template = smollm2
    model = copy.deepcopy(model0).double()
    del model.layers[2:]
    model.args.n_layers = 2
    model.double().train()
    items = list(islice(iter_wiki_sample(), 6))
    queries = [tok(t, add_special_tokens=False)["input_ids"][:16] for t, _ in items[:2]]
    passages = [tok(x, add_special_tokens=False)["input_ids"][:48] for _, x in items]  # groups of 3
    batch, special = pack_encode_reference(queries + passages, template, ["query"] * 2 + ["passage"] * 6, 1 << 30)
    module = ContrastiveModule(model, ContrastiveConfig(temperature=TEMPERATURE))
    loss, _ = module(batch, special, 2, 3, 2)
    loss.backward()
    ref = hf_reference_model(model).train()
    want = dense_reference(ref, template, queries, passages, TEMPERATURE, 3)
    want.backward()
    torch.testing.assert_close(loss, want, atol=0, rtol=1e-12)
    _compare_grads({k: p.grad for k, p in model.named_parameters()}, _grads_hf(ref), rel=1e-10)


@pytest.mark.e2e
@pytest.mark.parametrize("grad_cache", [False, True])
def test_cross_rank_negatives_two_processes_match_transcription(tmp_path, grad_cache):
    """2 gloo processes, 2 queries each, every query scored against all 12 passages of both ranks
    (all-gather with gradients) == the dense transcription over the 4 queries in one process; with
    GradCache, each rank's 2 queries come as 2 micro-batches of 1 through the step core."""
    out = tmp_path / "dist.pt"
    run_entry([str(ROOT / "tests" / "unit" / "contrastive_dist.py")], [str(out), *(["grad_cache"] * grad_cache)],
              nproc=2)
    got = torch.load(out)
    model, template = tiny_model()
    queries, passages = global_batch(template)
    ref = hf_reference_model(model).train()
    want = dense_reference(ref, template, queries, passages, TEMPERATURE, GROUP)
    want.backward()
    # (the step core logs its parts in the parameters' dtype: float64 here)
    torch.testing.assert_close(got["loss"], want.detach(), atol=0, rtol=1e-12)
    _compare_grads(got["grads"], _grads_hf(ref), rel=1e-10)
    # without the other rank's passages the loss is different: the gather matters
    B = Q_TOTAL // 2
    local = dense_reference(ref, template, queries[:B], passages[:B * GROUP], TEMPERATURE, GROUP)
    assert abs(float(local.detach()) - float(want.detach())) > 1e-3


# ---- GradCache -------------------------------------------------------------------------------------
class GradRecorder:
    """Stands in for the optimizer of optimizer_step: keeps the step's gradients, changes nothing."""

    def __init__(self, model):
        self.params = list(model.named_parameters())
        self.grads = None

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.params if p.grad is not None}

    def zero_grad(self, set_to_none=True):
        for _, p in self.params:
            p.grad = None


def micro_batches(template, queries, passages, group, per_mb):
    """ContrastiveBatches of per_mb queries each, every query followed by its group."""
    from llara_fast.data.loader import ContrastiveBatch

    out = []
    for i in range(0, len(queries), per_mb):
        qs, ps = queries[i:i + per_mb], passages[i * group:(i + per_mb) * group]
        batch, special = pack_encode_reference(qs + ps, template, ["query"] * len(qs) + ["passage"] * len(ps), 1 << 30)
        out.append(ContrastiveBatch(batch, special, len(qs), group))
    return out


def step_grads(model, mbs, grad_cache: bool, temperature=TEMPERATURE):
    from llara_fast.objectives.contrastive import ContrastiveObjective
    from llara_fast.train.step import optimizer_step

    cfg = ContrastiveConfig(temperature=temperature, grad_cache=grad_cache)
    objective = ContrastiveObjective(model.args.vocab_size, cfg)
    rec = GradRecorder(model)
    stats = optimizer_step(ContrastiveModule(model, cfg), mbs, rec, None, objective, device=torch.device("cpu"),
                           grad_clip=0.0)
    return rec.grads, stats, objective


def _rel(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b)


def test_grad_cache_equals_one_piece_float64():
    """4 micro-batches of 1 query through GradCache == the 4 queries in one piece (float64: to its
    rounding); without GradCache the same 4 micro-batches are 4 separate contrastive groups."""
    model, template = tiny_model()
    queries, passages = global_batch(template)
    one, s1, _ = step_grads(model, micro_batches(template, queries, passages, GROUP, 4), grad_cache=False)
    cached, s4, obj = step_grads(model, micro_batches(template, queries, passages, GROUP, 1), grad_cache=True)
    assert _rel(cached, one) < 1e-12 and obj.replay_error == 0.0
    assert s4.parts == pytest.approx(s1.parts, rel=1e-12) and s4.counts == s1.counts
    split, s_split, _ = step_grads(model, micro_batches(template, queries, passages, GROUP, 1), grad_cache=False)
    assert _rel(split, one) > 1e-3 and abs(s_split.parts[0] - s1.parts[0]) > 1e-3  # the group matters


def test_grad_cache_equals_one_piece_smollm2(smollm2):
    """Real SmolLM2-135M weights (first 2 blocks), real text, float64 (algebra: the two are the same
    sum in other groupings, so they agree to float64 rounding, ALGEBRA_RTOL): a 4-chunk GradCache
    step has the parameter gradients of the same 8 queries in one piece."""
    import copy
    from itertools import islice

    from llara_fast.data.sources import iter_wiki_sample

    model0, tok, template = smollm2
    model = copy.deepcopy(model0)
    del model.layers[2:]
    model.args.n_layers = 2
    model.double().train()
    items = list(islice(iter_wiki_sample(), 24))
    queries = [tok(t, add_special_tokens=False)["input_ids"][:16] for t, _ in items[:8]]
    passages = [tok(x, add_special_tokens=False)["input_ids"][:40] for _, x in items[:16]]  # groups of 2
    one, s1, _ = step_grads(model, micro_batches(template, queries, passages, 2, 8), False, temperature=0.05)
    cached, s4, obj = step_grads(model, micro_batches(template, queries, passages, 2, 2), True, temperature=0.05)
    assert obj.replay_error == 0.0
    assert s4.parts[0] == pytest.approx(s1.parts[0], rel=ALGEBRA_RTOL)  # parts in the parameters' dtype: float64
    assert _rel(cached, one) < ALGEBRA_RTOL


def test_grad_cache_replays_dropout():
    """LoRA dropout in a GradCache step: each re-run draws the first pass's masks."""
    from llara_fast.lora import apply_lora

    model, template = tiny_model()
    apply_lora(model, 4, 8.0, 0.3, "wq,wv")
    model.train()
    queries, passages = global_batch(template)
    grads, _, obj = step_grads(model, micro_batches(template, queries, passages, GROUP, 1), grad_cache=True)
    assert obj.replay_error == 0.0 and grads
