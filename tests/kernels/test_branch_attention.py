"""branch_attention (packed causal attention + one outside key range per segment) against the
dense PyTorch reference: every dtype against a float64 truth within tests/errmodel.py's worst-case
attention bound; interpreted on a CPU, compiled on a GPU, where bf16
and a llama-sized case (head dim 128, segments over several tiles) run too."""
import pytest
import torch
from conftest import CUDA, needs_interpreter, poison_empty
from errmodel import assert_within, attention_tols

from llara_fast.kernels import branch_attention as ba_mod
from llara_fast.kernels.branch_attention import branch_attention
from llara_fast.kernels.reference import branch_attention_mask, branch_attention_reference

# Segment layouts: (lengths, {segment: (context start, context end)}). Contexts sit in an earlier
# segment like a PRED branch's BOS..TEXT, in a later one, across two segments, or are absent.
LAYOUTS = {
    "branches": ([37, 9, 1, 50, 20], {1: (0, 30), 4: (47, 92)}),
    "awkward": ([17, 33, 5, 70], {0: (22, 50), 2: (90, 125), 3: (17, 21)}),  # later / spanning contexts
    "plain": ([16, 3, 48], {}),  # encoding batches: no contexts
    "llama": ([300, 12, 1, 257, 9], {1: (0, 290), 4: (302, 550)}),  # GPU only: several 128-row tiles
}
HEADS = {"branches": (4, 2, 24), "awkward": (3, 1, 16), "plain": (2, 2, 40),  # H, KV, D: GQA, MQA, D not 2^k
         "llama": (8, 2, 128)}
DEVICE = "cuda" if CUDA else "cpu"  # for the tests of one case: compiled on a GPU, interpreted elsewhere


def _layout(name, device):
    lens, ctx = LAYOUTS[name]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    c0 = torch.tensor([ctx.get(s, (0, 0))[0] for s in range(len(lens))])
    c1 = torch.tensor([ctx.get(s, (0, 0))[1] for s in range(len(lens))])
    max_ctx = max([b - a for a, b in ctx.values()], default=0)
    return cu.to(device), c0.to(device), c1.to(device), max(lens), max_ctx


def _inputs(name, dtype, device):
    H, KV, D = HEADS[name]
    cu = _layout(name, "cpu")[0]
    N = int(cu[-1])
    gen = torch.Generator().manual_seed(len(name))
    q, k, v = (torch.randn(N, h, D, generator=gen).to(device, dtype).requires_grad_() for h in (H, KV, KV))
    do = torch.randn(N, H, D, generator=gen).to(device, dtype)
    return q, k, v, do


def _cases():
    gpu = pytest.mark.skipif(not CUDA, reason="no CUDA device (bf16 and the compiled kernels: GPU only)")
    cases = [pytest.param("cpu", d, id=f"cpu-{d}".replace("torch.", ""), marks=needs_interpreter)
             for d in (torch.float32, torch.float16)]
    return cases + [pytest.param("cuda", d, id=f"cuda-{d}".replace("torch.", ""), marks=gpu)
                    for d in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("device,dtype", _cases())
def test_matches_reference(device, dtype, name, monkeypatch):
    if name == "llama" and device == "cpu":
        pytest.skip("the llama-sized case runs compiled, on a GPU (minutes interpreted)")
    monkeypatch.setattr(ba_mod, "_empty", poison_empty)  # an unwritten row or gradient shows as NaN
    cu, c0, c1, max_len, max_ctx = _layout(name, device)
    q, k, v, do = _inputs(name, dtype, device)
    out = branch_attention(q, k, v, cu, c0, c1, max_len, max_ctx)
    grads = torch.autograd.grad(out, (q, k, v), do)
    # every dtype against the float64 truth on the same (half-valued) inputs, within the worst-case
    # bound: fp32 arithmetic, plus the half format's storage of P, dS and the outputs
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    cu, c0, c1 = cu.cpu(), c0.cpu(), c1.cpu()
    want = branch_attention_reference(q64, k64, v64, cu, c0, c1)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), do.cpu().double())
    tols = attention_tols(q, k, v, branch_attention_mask(cu, c0, c1), do,
                          storage=None if dtype == torch.float32 else dtype)
    for what, got, ref, tol in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads), tols):
        assert_within(got.cpu(), ref.detach(), tol, what)


def test_bound_catches_a_wrong_mask():
    """The fp32 bound is far tighter than a real defect: the reference with one key dropped from
    one query's context falls outside it."""
    cu, c0, c1, *_ = _layout("branches", "cpu")
    q, k, v, do = _inputs("branches", torch.float32, "cpu")
    mask = branch_attention_mask(cu, c0, c1)
    tol_o = attention_tols(q, k, v, mask, do)[0]
    c0_wrong = c0.clone()
    c0_wrong[1] += 1  # segment 1 loses its first context key
    right = branch_attention_reference(q.double(), k.double(), v.double(), cu, c0, c1)
    wrong = branch_attention_reference(q.double(), k.double(), v.double(), cu, c0_wrong, c1)
    with pytest.raises(AssertionError, match="outside the rounding bound"):
        assert_within(wrong, right, tol_o, "out")


def test_bad_input_raises():
    cu, c0, c1, max_len, max_ctx = _layout("plain", "cpu")
    q, k, v, _ = _inputs("plain", torch.float32, "cpu")
    with pytest.raises(TypeError, match="share a float dtype"):
        branch_attention(q.double(), k, v, cu, c0, c1, max_len, max_ctx)
    with pytest.raises(ValueError, match="one per segment"):
        branch_attention(q, k, v, cu, c0[:-1], c1, max_len, max_ctx)
    with pytest.raises(ValueError, match="do not group"):
        branch_attention(q[:, :1].expand(-1, 3, -1), k, v, cu, c0, c1, max_len, max_ctx)


def test_strided_inputs_equal_contiguous():
    """q, k, v that are views into wider projections (as a fused qkv GEMM would give) produce the
    same output and gradients, bit for bit, as contiguous copies."""
    cu, c0, c1, max_len, max_ctx = _layout("branches", DEVICE)
    q, k, v, do = _inputs("branches", torch.float32, DEVICE)
    wide = torch.cat([q.detach(), k.detach(), v.detach()], dim=1).requires_grad_()  # (N, H + 2 KV, D)
    H, KV = q.shape[1], k.shape[1]
    views = wide[:, :H], wide[:, H:H + KV], wide[:, H + KV:]
    got = branch_attention(*views, cu, c0, c1, max_len, max_ctx)
    got_grad, = torch.autograd.grad(got, wide, do)
    want = branch_attention(q, k, v, cu, c0, c1, max_len, max_ctx)
    want_grads = torch.autograd.grad(want, (q, k, v), do)
    assert torch.equal(got, want)
    assert torch.equal(got_grad, torch.cat(want_grads, dim=1))
