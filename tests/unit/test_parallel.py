"""llara_fast/train/parallel.py: the FSDP2 reshard lever and compile of the blocks change speed, memory
and copies, not numbers."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import random_examples, toy_template
from torch._dynamo.utils import counters

from llara_fast.config import PRESETS, ModelArgs
from llara_fast.data.packing import pack_reference
from llara_fast.model import Transformer
from llara_fast.objectives.llara import LlaraTrainModule, LossConfig
from llara_fast.train.parallel import apply_compile, parallelize
from llara_fast.train.trainer import init_distributed


def _train(reshard: bool, batches) -> list[torch.Tensor]:
    model = Transformer(ModelArgs(dim=32, n_layers=3, n_heads=4, vocab_size=80, ffn_hidden=48), attn_backend="sdpa")
    model.init_weights(seed=5)
    module = parallelize(model, LlaraTrainModule(model, LossConfig(impl="torch")), "none", False, torch.float32,
                         reshard=reshard)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    for b in batches:
        total, _ = module(b)
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.full_tensor().detach().clone() for p in module.parameters()]


def test_no_reshard_trains_bit_for_bit_alike(monkeypatch):
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(28000 + os.getpid() % 1000)}.items():
        monkeypatch.setenv(k, v)
    rng = np.random.default_rng(6)
    batches = [pack_reference(random_examples(rng, [9, 14, 6], 80, n_targets=(1, 8)), toy_template(80), 200)
               for _ in range(3)]
    init_distributed("cpu")
    try:
        a, b = _train(True, batches), _train(False, batches)
    finally:
        dist.destroy_process_group()
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], _fresh_first_param())  # it trained


def _fresh_first_param() -> torch.Tensor:
    m = Transformer(ModelArgs(dim=32, n_layers=3, n_heads=4, vocab_size=80, ffn_hidden=48), attn_backend="sdpa")
    m.init_weights(seed=5)
    return next(LlaraTrainModule(m, LossConfig()).parameters()).detach()


def _step_grads(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module = LlaraTrainModule(model, LossConfig(impl="reference"))  # float64 logits
    total, _ = module(batch)
    grads = torch.autograd.grad(total, [p for p in module.parameters()])
    return total.detach(), grads


@pytest.mark.e2e  # torch.compile (inductor, a C++ toolchain) of real blocks, 6-35 s
def test_compiled_blocks_equal_eager_without_recompiling():
    """apply_compile (inductor on CPU) gives the eager step's loss and gradients on the debug model, in float64 (the
    two differ by reassociation only: 1e-9 relative is rounding there, a real difference is not),
    and batches of other token counts reuse the compiled blocks: no recompile per batch."""
    args = PRESETS["debug"]  # 2 blocks, grouped-query heads
    eager = Transformer(args, attn_backend="sdpa").double()
    eager.init_weights(seed=7)
    compiled = Transformer(args, attn_backend="sdpa").double()
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    apply_compile(compiled.layers)
    rng = np.random.default_rng(8)
    lengths = ([9, 14, 6], [30, 3, 11], [17, 17, 25])  # three token counts, as every step has
    graphs = []
    for lens in lengths:
        b = pack_reference(random_examples(rng, lens, 80, n_targets=(1, 8)), toy_template(80), 200)
        (want, want_g), (got, got_g) = _step_grads(eager, b), _step_grads(compiled, b)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
        for g, w in zip(got_g, want_g):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0, "nothing was compiled"
    assert graphs[-1] == graphs[0], f"recompiled for new token counts: unique graphs {graphs}"
