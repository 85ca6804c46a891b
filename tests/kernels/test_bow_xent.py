"""bow_xent (fused projection + pooled bag-of-words CE) against the PyTorch reference."""
import pytest
import torch
from conftest import kernel_cases, poison_empty
from errmodel import assert_within, logit_error, sum_tol, xent_grad_tol

from llara_fast.kernels import bow_xent as bow_mod
from llara_fast.kernels.bow_xent import bow_xent
from llara_fast.kernels.reference import bow_xent_from_logits, bow_xent_reference

# fp32 is checked against a float64 truth under the rounding bound of tests/errmodel.py; the
# half formats against the fp32 reference with fixed tolerances (their error is dominated by
# rounding each stored logit and gradient to 11 / 8 bits, about 1e-3 / 1e-2 relative)
TOL = {torch.float16: (2e-2, 2e-2), torch.bfloat16: (3e-2, 3e-2)}
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
    ref_loss, ref_valid = bow_xent_reference(h, w, offsets, ids, pooling)
    rgh, rgw = torch.autograd.grad((ref_loss * g).sum(), (h, w))

    assert valid.tolist() == ref_valid.tolist() and valid.tolist()[1] is False
    assert loss[1].item() == 0.0
    if dtype == torch.float32:
        _check_fp32(h, w, offsets, ids, g, pooling, loss, gh, gw)
        return
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(gh.float(), rgh.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(gw.float(), rgw.float(), atol=atol, rtol=rtol)


def _check_fp32(h, w, offsets, ids, g, pooling, loss, gh, gw):
    """fp32 results against the float64 reference, within the rounding bound."""
    E, K, d = h.shape
    h64, w64 = h.detach().cpu().double(), w.detach().cpu().double()
    z64 = (h64 @ w64.t()).requires_grad_()  # (E, K, V)
    ref64, _ = bow_xent_from_logits(z64, offsets.cpu(), ids.cpu(), pooling)
    G, = torch.autograd.grad((ref64 * g.cpu().double()).sum(), z64)  # (E, K, V)
    dz = logit_error(h64.reshape(E * K, d), w64).reshape(E, K).amax(1)  # (E,)
    assert_within(loss.cpu(), ref64.detach(), 2 * dz + sum_tol(w.shape[0], 1.0), "loss")
    tol_h, tol_w = xent_grad_tol(h64.reshape(E * K, d), w64, G.reshape(E * K, -1))
    assert_within(gh.cpu(), (G @ w64).detach(), tol_h.reshape(E, K, d), "dL/dh")
    assert_within(gw.cpu(), (G.reshape(E * K, -1).t() @ h64.reshape(E * K, d)).detach(), tol_w, "dL/dw")


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
