"""PackedLoader: the batches of the background packer, and its exact resume position."""
import numpy as np
import pytest
import torch
from conftest import random_examples, toy_template
from test_packing import assert_same_batch
from test_shards import write_dataset

from llara_fast.data.loader import LoaderOptions, PackedLoader
from llara_fast.data.native import native_packer_available
from llara_fast.data.packing import pack_greedy_reference
from llara_fast.data.shards import ExampleStream, epoch_order

MAX_LEN, BUDGET = 24, 120


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    exs = random_examples(rng, rng.integers(0, 40, size=61), 300)
    return write_dataset(tmp_path, exs, shard_examples=16, max_len=32), exs


def expected_batches(ds, exs, tpl, epochs, **kw):
    """Reference: greedy packing of each epoch's order, independently (groups never cross epochs)."""
    out = []
    for ep in range(epochs):
        order = epoch_order(len(ds), kw.get("seed", 0), ep, kw.get("rank", 0), kw.get("world_size", 1))
        out += pack_greedy_reference([exs[i] for i in order], tpl, MAX_LEN, BUDGET)
    return out


@pytest.mark.parametrize("native", [True, False])
def test_batches_match_reference(data, native):
    if native and not native_packer_available():
        pytest.skip("llara_fast._C is not built")
    ds, exs = data
    tpl = toy_template(300)
    with PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(seed=0, epochs=2, prefetch=2, groups_per_call=3,
                      native=native)) as loader:
        got = list(loader)
    ref = expected_batches(ds, exs, tpl, 2)
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        assert_same_batch(a, b)
    assert loader.examples == 2 * len(exs)
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["position"] == 0


def test_resume_is_exact_despite_prefetch(data):
    """The saved position is after the last batch handed out, not the producer's position."""
    ds, exs = data
    tpl = toy_template(300)
    kw = dict(seed=4, epochs=3, prefetch=4, groups_per_call=2)
    full = list(PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(**kw)))
    n_epoch0 = len(expected_batches(ds, exs, tpl, 1, seed=4))
    for cut in (1, 3, n_epoch0, n_epoch0 + 2):
        a = PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(**kw))
        head = [next(a) for _ in range(cut)]
        state = a.state_dict()
        a.close()
        b = PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(**kw))
        b.load_state_dict(state)
        rest = list(b)
        assert len(head) + len(rest) == len(full), cut
        for x, y in zip(full, head + rest):
            assert_same_batch(x, y)
    # restoring into a running loader restarts its producer at the restored point
    c = PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(**kw))
    for _ in range(5):
        next(c)
    c.load_state_dict(state)
    assert_same_batch(next(c), full[n_epoch0 + 2])
    c.close()
    with pytest.raises(ValueError, match="token_budget"):
        PackedLoader(ds, tpl, MAX_LEN, BUDGET + 1, LoaderOptions(**kw)).load_state_dict(state)


def test_ranks_and_limits(data):
    ds, exs = data
    tpl = toy_template(300)
    for r in range(2):
        got = list(PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(seed=1, rank=r, world_size=2, epochs=1)))
        ref = expected_batches(ds, exs, tpl, 1, seed=1, rank=r, world_size=2)
        assert len(got) == len(ref)
        for a, b in zip(ref, got):
            assert_same_batch(a, b)
    with pytest.raises(ValueError, match="prepared with"):
        PackedLoader(ds, tpl, 33, BUDGET)
    with pytest.raises(ValueError, match="token budget"):
        next(PackedLoader(ds, tpl, MAX_LEN, 40))  # an example of 24 + 23 tokens cannot fit: raised in __next__
    infinite = PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(prefetch=1))  # epochs=None: rolls over forever
    n = sum(1 for _, b in zip(range(100), infinite))
    assert n == 100 and infinite.state_dict()["epoch"] >= 2
    infinite.close()
    assert isinstance(next(iter(infinite)).input_ids, torch.Tensor)  # restarts after close
    infinite.close()


def test_stream_and_loader_agree(data):
    """ExampleStream (the Example iterator) walks the same order the loader packs."""
    ds, _ = data
    tpl = toy_template(300)
    exs = [e for e in ExampleStream(ds, seed=2, epochs=1)]
    got = list(PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(seed=2, epochs=1)))
    for a, b in zip(pack_greedy_reference(exs, tpl, MAX_LEN, BUDGET), got):
        assert_same_batch(a, b)


def test_microbatch_sharding_is_world_size_independent(data):
    """dp_rank/dp_world deal micro-batches: ranks 0 and 1 interleaved give exactly the
    single-rank stream, and each rank resumes exactly from its own position."""
    ds, exs = data
    tpl = toy_template(300)
    kw = dict(seed=2, epochs=2, prefetch=2, groups_per_call=2)
    single = list(PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(**kw)))
    r0 = list(PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(dp_rank=0, dp_world=2, **kw)))
    r1 = list(PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(dp_rank=1, dp_world=2, **kw)))
    assert len(r0) + len(r1) == len(single)
    for i, b in enumerate(single):
        assert_same_batch(b, (r0 if i % 2 == 0 else r1)[i // 2])
    a = PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(dp_rank=1, dp_world=2, **kw))
    head = [next(a) for _ in range(3)]
    state = a.state_dict()
    a.close()
    b = PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(dp_rank=1, dp_world=2, **kw))
    b.load_state_dict(state)
    for x, y in zip(head + list(b), r1):
        assert_same_batch(x, y)
    with pytest.raises(ValueError, match="dp_world=2, this run has 3"):
        PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(dp_rank=1, dp_world=3, **kw)).load_state_dict(state)


@pytest.mark.parametrize("groups_per_call", [1, 3])
def test_epoch_micro_batches_count_what_the_loader_yields(data, groups_per_call):
    """run.epochs' step count rests on epoch_micro_batches: per epoch, exactly the micro-batches the
    producer's windows pack (all dp ranks together), for a small and a large window; and the clock
    over it puts each step's end at the epoch the data reached."""
    from llara_fast.train.epochs import EpochClock

    ds, _ = data
    tpl = toy_template(300)
    kw = dict(seed=3, groups_per_call=groups_per_call, prefetch=1)
    one = PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(epochs=1, **kw))
    per_epoch = [one.epoch_micro_batches(e) for e in range(3)]
    assert len(list(one)) == per_epoch[0]
    three = PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(epochs=3, **kw))
    assert len(list(three)) == sum(per_epoch)
    halves = [len(list(PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(dp_rank=r, dp_world=2, epochs=1, **kw))))
              for r in range(2)]
    assert sum(halves) == per_epoch[0] == one.epoch_micro_batches(0)
    clock = EpochClock(one.epoch_micro_batches, 2, "")
    steps = clock.steps_for(3)
    assert steps == -(-sum(per_epoch) // 2)  # the last step may start epoch 4
    walk = PackedLoader(ds, tpl, MAX_LEN, BUDGET, LoaderOptions(**kw))
    for step in range(1, steps + 1):
        for _ in range(2):
            next(walk)
        assert int(clock.epoch_at(step)) == walk.state_dict()["epoch"], step  # the epoch the data is in
    walk.close()
    assert 3 <= clock.epoch_at(steps) < 3 + 2 / per_epoch[2]
    assert clock.units_in(1.5) == per_epoch[0] + round(0.5 * per_epoch[1])
