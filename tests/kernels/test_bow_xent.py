"""bow_xent (fused projection + pooled bag-of-words CE) against the PyTorch reference."""
import pytest
import torch
from conftest import kernel_cases, poison_empty
from errmodel import assert_within, bow_tols, xent_loss_tol

from llara_fast.kernels import bow_xent as bow_mod
from llara_fast.kernels.bow_xent import bow_xent
from llara_fast.kernels.reference import bow_xent_from_logits, bow_xent_reference

# Every dtype is checked against a float64 truth on the same (half-valued) inputs under the
# worst-case bounds of tests/errmodel.py: fp32 arithmetic, plus the half format's rounding of what
# it stores (logits, dL/dz, outputs) for fp16 / bf16.
SHAPES = [  # E, K, d, V
    (3, 8, 32, 256),
    (7, 5, 40, 1000),      # awkward: K not a power of two, d and V not multiples of the tiles
    (2, 8, 16, 70_001),    # vocabulary > 65,536
    (4, 1, 24, 300),       # n_special = 1, the paper's single-token form
]


def _targets(E, V, gen, device):
    """CSR targets with an empty set, duplicates, and the vocabulary's first and last ids."""
    sets = []
    for e in range(E):
        if e == 1:
            sets.append([])
            continue
        n = int(torch.randint(1, 20, (1,), generator=gen))
        ids = torch.randint(0, V, (n,), generator=gen).tolist()
        sets.append(ids + ids[:3] + ([0, V - 1] if e == 0 else []))  # repeats count once
    offsets = torch.tensor([0] + [sum(len(s) for s in sets[:i + 1]) for i in range(E)])
    ids = torch.tensor([t for s in sets for t in s], dtype=torch.int64)
    return offsets.to(device), ids.to(device)


@pytest.mark.parametrize("pooling", ["max", "mean"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device,dtype,impl", kernel_cases())
def test_matches_reference(device, dtype, impl, shape, pooling, monkeypatch):
    E, K, d, V = shape
    if V > 65536 and impl == "triton" and device == "cpu" and (pooling == "mean" or dtype != torch.float32):
        pytest.skip("the large-vocabulary case runs interpreted once (fp32, max pooling) to keep CPU time low")
    monkeypatch.setattr(bow_mod, "_empty", poison_empty)
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    h = (torch.randn(E, K, d, generator=gen)).to(device, dtype).requires_grad_()
    w = (torch.randn(V, d, generator=gen) * 0.5).to(device, dtype).requires_grad_()
    offsets, ids = _targets(E, V, gen, device)
    g = torch.randn(E, generator=gen).to(device)

    loss, valid = bow_xent(h, w, offsets, ids, pooling, impl=impl)
    gh, gw = torch.autograd.grad((loss * g).sum(), (h, w))
    _, ref_valid = bow_xent_reference(h, w, offsets, ids, pooling)

    assert valid.tolist() == ref_valid.tolist() and valid.tolist()[1] is False
    assert loss[1].item() == 0.0
    check_against_truth(h, w, offsets, ids, g, pooling, loss, gh, gw)


def bow_truth(h, w, offsets, ids, g, pooling):
    """float64 truth on the inputs' values: (z (E, K, V), loss (E,), dL/dz (E, K, V), dL/dh, dL/dw)."""
    E, K, d = h.shape
    h64, w64 = h.detach().cpu().double(), w.detach().cpu().double()
    z64 = (h64 @ w64.t()).requires_grad_()  # (E, K, V)
    ref64, _ = bow_xent_from_logits(z64, offsets.cpu(), ids.cpu(), pooling)
    G, = torch.autograd.grad((ref64 * g.cpu().double()).sum(), z64)  # (E, K, V)
    return z64.detach(), ref64.detach(), G, G @ w64, G.reshape(E * K, -1).t() @ h64.reshape(E * K, d)


def check_against_truth(h, w, offsets, ids, g, pooling, loss, gh, gw):
    """The kernel's results against the float64 truth, within the worst-case bounds."""
    dtype = h.dtype
    storage = None if dtype == torch.float32 else dtype
    z64, ref64, G, rgh, rgw = bow_truth(h, w, offsets, ids, g, pooling)
    valid = (offsets.diff() > 0).cpu()
    tol_h, tol_w, dzp = bow_tols(h.detach().cpu(), w.detach().cpu(), z64, G, pooling, g.cpu() * valid,
                                 storage=storage)
    zp = z64.max(1).values if pooling == "max" else z64.mean(1)
    n_t = max(int(d) for d in offsets.diff())
    assert_within(loss.cpu(), ref64, xent_loss_tol(zp, dzp, n_t) * valid, "loss")
    assert_within(gh.cpu(), rgh, tol_h, "dL/dh")
    assert_within(gw.cpu(), rgw, tol_w, "dL/dw")


def test_bounds_catch_real_defects():
    """The worst-case bounds stay far below a real defect: a 1% error in one target's weight and a
    vocabulary column dropped from the log-sum-exp each fall outside them."""
    gen = torch.Generator().manual_seed(5)
    E, K, d, V = 3, 8, 32, 1000
    h, w = torch.randn(E, K, d, generator=gen), torch.randn(V, d, generator=gen) * 0.5
    offsets, ids = torch.tensor([0, 5, 9, 12]), torch.randint(0, V - 1, (12,), generator=gen)
    g = torch.ones(E)
    z64, _, G, rgh, rgw = bow_truth(h, w, offsets, ids, g, "max")
    tol_h, tol_w, _ = bow_tols(h, w, z64, G, "max", g)
    assert_within(G @ w.double(), rgh, tol_h, "the truth itself")
    # the first target of example 0 weighted 1% more
    arg = z64.max(1).indices
    t0 = int(ids[0])
    bad = G.clone()
    bad[0, arg[0, t0], t0] -= 0.01 / len(set(ids[:5].tolist()))
    with pytest.raises(AssertionError, match="outside the rounding bound"):
        assert_within(bad @ w.double(), rgh, tol_h, "1% target weight")
    # vocabulary column V-1 (not a target) missing from the softmax: its head gradient is lost
    zd = z64.clone()
    zd[..., V - 1] = float("-inf")
    zd.requires_grad_()
    lossd, _ = bow_xent_from_logits(zd, offsets, ids, "max")
    Gd, = torch.autograd.grad(lossd.sum(), zd)
    with pytest.raises(AssertionError, match="outside the rounding bound"):
        assert_within(Gd.reshape(E * K, V).t() @ h.double().reshape(E * K, d), rgw, tol_w, "dropped column")


def test_duplicates_are_a_set():
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(1, 8, 16, generator=gen), torch.randn(50, 16, generator=gen)
    a, _ = bow_xent(h, w, torch.tensor([0, 3]), torch.tensor([4, 9, 4]))
    b, _ = bow_xent(h, w, torch.tensor([0, 2]), torch.tensor([9, 4]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_input_raises_before_kernel(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("kernel launched")

    monkeypatch.setattr(bow_mod, "_bow_fwd_triton", boom)
    monkeypatch.setattr(bow_mod, "_bow_fwd_torch", boom)
    h, w = torch.randn(2, 8, 16), torch.randn(50, 16)
    off, ids = torch.tensor([0, 1, 2]), torch.tensor([3, 4])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bow_xent(h, w, off, torch.tensor([3, 50]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bow_xent(h, w, off, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match=r"hidden \(E, K, d\)"):
        bow_xent(h[0], w, off, ids)
    with pytest.raises(ValueError, match="offsets must be"):
        bow_xent(h, w, torch.tensor([0, 2]), ids)
    with pytest.raises(TypeError, match="share a float dtype"):
        bow_xent(h.double(), w, off, ids)
    with pytest.raises(ValueError, match="pooling"):
        bow_xent(h, w, off, ids, "sum")
