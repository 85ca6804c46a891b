"""linear_xent (fused linear + LM CE, chunked) against the PyTorch reference."""
import pytest
import torch
from conftest import kernel_cases, poison_empty
from errmodel import assert_within, gamma, logit_error_stored, softmax_rel_error, xent_grad_tol, xent_loss_tol

from llara_fast.kernels import linear_xent as lx_mod
from llara_fast.kernels.linear_xent import linear_xent
from llara_fast.kernels.reference import linear_xent_reference

# Every dtype against a float64 truth on the same (half-valued) inputs under the worst-case
# bounds of tests/errmodel.py (fp32 arithmetic, plus the half format's storage for fp16 / bf16).
SHAPES = [  # M, d, V, chunk rows
    (64, 32, 512, 16),
    (47, 40, 1000, 16),     # awkward: rows not a multiple of the chunk, V not a multiple of the tile
    (20, 16, 70_001, 8),    # vocabulary > 65,536
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device,dtype,impl", kernel_cases())
def test_matches_reference(device, dtype, impl, shape, monkeypatch):
    M, d, V, chunk = shape
    if V > 65536 and impl == "triton" and device == "cpu" and dtype != torch.float32:
        pytest.skip("the large-vocabulary case runs interpreted once (fp32) to keep CPU time low")
    monkeypatch.setattr(lx_mod, "_empty", poison_empty)
    gen = torch.Generator().manual_seed(M * V)
    h = torch.randn(M, d, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(V, d, generator=gen) * 0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (M,), generator=gen)
    y[0], y[1] = 0, V - 1
    y = y.to(device)
    loss = linear_xent(h, w, y, chunk_rows=chunk, impl=impl)
    gh, gw = torch.autograd.grad(loss * 1.3, (h, w))
    check_against_truth(h, w, y, 1.3, loss, gh, gw)


def check_against_truth(h, w, y, scale, loss, gh, gw):
    """loss and gradients against the float64 truth on the inputs' values, within the worst-case bounds."""
    storage = None if h.dtype == torch.float32 else h.dtype
    h64, w64 = h.detach().cpu().double(), w.detach().cpu().double()
    z64 = (h64 @ w64.t()).requires_grad_()  # (M, V)
    ref64 = torch.nn.functional.cross_entropy(z64, y.cpu())
    G, = torch.autograd.grad(ref64 * scale, z64)  # (M, V)
    z64 = z64.detach()
    P = z64.softmax(-1) * (scale / h.shape[0])  # (M, V) the softmax part of G
    dz = logit_error_stored(h64, w64, storage=storage)  # (M, 1)
    tol_h, tol_w = xent_grad_tol(h64, w64, G, P, softmax_rel_error(z64, dz), storage=storage)
    row_tol = xent_loss_tol(z64, dz, 1)  # (M,)
    rows = torch.nn.functional.cross_entropy(z64, y.cpu(), reduction="none")
    loss_tol = row_tol.mean() + gamma(h.shape[0]) * rows.abs().mean()  # the mean of M row losses
    assert_within(loss.cpu(), ref64.detach(), loss_tol, "loss")
    assert_within(gh.cpu(), G @ w64, tol_h, "dL/dh")
    assert_within(gw.cpu(), G.t() @ h64, tol_w, "dL/dw")


def test_no_rows_gives_zero_gradients(monkeypatch):
    """No LM positions: loss 0 and an all-zero weight gradient (the one case grad_w is not
    overwritten by a first chunk, so it must come zero-filled, not from the allocator)."""
    monkeypatch.setattr(lx_mod, "_empty", poison_empty)
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    loss = linear_xent(h, w, torch.zeros(0, dtype=torch.long), impl="torch")
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert float(loss) == 0.0 and gh.shape == (0, 8) and torch.equal(gw, torch.zeros(30, 8))


def test_no_grad_forward_only():
    h, w = torch.randn(10, 8), torch.randn(30, 8)
    y = torch.randint(0, 30, (10,))
    z = h.double() @ w.double().t()  # (10, 30)
    rows = torch.nn.functional.cross_entropy(z, y, reduction="none")
    tol = xent_loss_tol(z, logit_error_stored(h, w), 1).mean() + gamma(10) * rows.mean()
    for got in (linear_xent(h, w, y), linear_xent_reference(h, w, y)):
        assert_within(got, rows.mean(), tol, "loss")


def test_bad_input():
    h, w = torch.randn(4, 8), torch.randn(30, 8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_xent(h, w, torch.tensor([1, 2, 30, 0]))
    with pytest.raises(ValueError, match="targets must be"):
        linear_xent(h, w, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="targets must be int"):
        linear_xent(h, w, torch.zeros(4))
    with pytest.raises(ValueError, match=r"hidden \(M, d\)"):
        linear_xent(h, torch.randn(30, 9), torch.tensor([1, 2, 3, 0]))


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("vocab", [60, 32000, 49168, 151936])
def test_default_chunk_rows(vocab, device_type):
    """The fewest chunks the logits budget allows, of equal size (a multiple of 16): each chunk
    costs one more pass over the (V, d) weight and one more fp32 head-gradient accumulation."""
    budget = lx_mod.CHUNK_BUDGET_BYTES[device_type]
    most = budget // (4 * vocab) // 16 * 16
    for rows in (1, 17, 383, 1146, 4096, 16384, 100_000):
        c = lx_mod.default_chunk_rows(vocab, rows, device_type)
        n = -(-rows // c)
        assert c % 16 == 0 and c <= max(16, min(16384, most))
        assert n == max(1, -(-rows // max(16, min(16384, most)))), (rows, c)  # no more chunks than needed
        assert c - 16 < -(-rows // n) <= c  # equal chunks: the last is at most 16 rows short of the others
