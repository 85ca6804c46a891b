"""llara_fast/train/parallel.py: the FSDP2 reshard lever changes memory and copies, not numbers."""
import os

import numpy as np
import torch
import torch.distributed as dist
from conftest import random_examples, toy_template

from llara_fast.config import ModelArgs
from llara_fast.data.packing import pack_reference
from llara_fast.model import Transformer
from llara_fast.objectives.llara import LlaraTrainModule, LossConfig
from llara_fast.train.parallel import parallelize
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
