"""The rounding-error model of tests/errmodel.py and the test-only shuffled matmul."""
import pytest
import shuffled_matmul
import torch
from errmodel import assert_within, gamma, pooled_unit_tol, sum_tol
from shuffled_matmul import _shuffled


def test_gamma():
    assert gamma(1) == pytest.approx(2.0**-24, rel=1e-6)
    assert gamma(1000) == pytest.approx(1000 * 2.0**-24 / (1 - 1000 * 2.0**-24))
    with pytest.raises(ValueError, match="vacuous"):
        gamma(4096, torch.float16)


@pytest.mark.parametrize("n", [7, 300, 5000])
def test_sum_bound_holds_for_many_orders(n):
    """fp32 dot products in several orders (BLAS, serial, reversed, pairwise, sorted by size) all
    lie within the worst-case bound of the float64 value, and the orders do round differently."""
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, generator=g) * 10, torch.randn(n, generator=g)
    a[::2] *= 1e3  # terms of very different sizes, both signs: cancellation
    exact = (a.double() * b.double()).sum()
    tol = sum_tol(n, (a.double().abs() * b.double().abs()).sum())
    prods = a * b
    serial = torch.zeros((), dtype=torch.float32)
    for x in prods:
        serial = serial + x
    rev = torch.zeros((), dtype=torch.float32)
    for x in prods.flip(0):
        rev = rev + x
    sorted_sum = torch.zeros((), dtype=torch.float32)
    for x in prods[prods.abs().argsort()]:
        sorted_sum = sorted_sum + x
    results = [a @ b, serial, rev, sorted_sum, prods.sum()]
    for r in results:
        assert_within(r, exact, tol, "dot")
    if n > 100:
        assert len({r.item() for r in results}) > 1


def test_pooled_unit_tol_holds_and_catches_a_small_change():
    """fp32 pooling (cast, mean over K, normalize) of float64 states, summed in two orders, lies
    within pooled_unit_tol of the float64 result; states moved by 1e-4 relative do not."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 8, 576, generator=g, dtype=torch.float64)
    h[:, :, 7] *= 300  # one massive-activation dimension, as LLMs have
    want = torch.nn.functional.normalize(h.mean(1), dim=-1)
    tol = pooled_unit_tol(h)
    for states in (h.float(), h.float().flip(1)):
        assert_within(torch.nn.functional.normalize(states.mean(1), dim=-1), want, tol, "pooled")
    sign = torch.randint(0, 2, (576,), generator=g).double() * 2 - 1  # (d,) each dimension up or down
    moved = torch.nn.functional.normalize((h * (1 + 1e-4 * sign)).float().mean(1), dim=-1)
    with pytest.raises(AssertionError, match="outside the rounding bound"):
        assert_within(moved, want, tol, "pooled")


def test_shuffled_matmul_is_a_product_in_another_order():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(33, 700, generator=g), torch.randn(700, 21, generator=g)
    got = _shuffled(a, b)
    want = a.double() @ b.double()
    assert_within(got, want, sum_tol(700, a.double().abs() @ b.double().abs()), "shuffled")
    if not shuffled_matmul._orig:  # not installed in this run: `@` is the library's product
        assert not torch.equal(got, a @ b)  # another rounding than the library's
