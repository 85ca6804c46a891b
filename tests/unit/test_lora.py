"""LoRA adapters: identity at init, only adapters train, merge == adapted forward."""
import pytest
import torch
from conftest import toy_template

from llara_fast.data.packing import pack_encode_reference
from llara_fast.lora import LoRALinear, apply_lora, merge_lora, parse_targets


def _model():
    from llara_fast.config import ModelArgs
    from llara_fast.model import Transformer

    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=200, ffn_hidden=64,
                     rope_theta=10000.0, max_seq_len=256, tie_embeddings=True)
    m = Transformer(args, attn_backend="sdpa")
    m.init_weights(std=0.1, seed=0)
    return m


def _batch():
    b, _ = pack_encode_reference([[5, 6, 7, 8], [9, 10]], toy_template(200), "passage", 64)
    return b


def test_lora_starts_at_base_and_trains_only_adapters():
    m = _model()
    before = m(_batch()).detach()
    n = apply_lora(m, rank=4, alpha=8, targets="wq,v_proj,down_proj")
    assert isinstance(m.layers[0].attention.wq, LoRALinear) and isinstance(m.layers[1].feed_forward.w2, LoRALinear)
    assert type(m.layers[0].attention.wk) is torch.nn.Linear  # not targeted
    trainable = {k for k, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in k or ".lora_B" in k for k in trainable)
    # rank 4 x (in + out) of wq (32 -> 32), wv (32 -> 16), w2 (64 -> 32), in each of 2 blocks
    assert n == sum(p.numel() for p in m.parameters() if p.requires_grad) == 2 * 4 * (64 + 48 + 96)
    torch.testing.assert_close(m(_batch()), before, rtol=0, atol=0)  # B = 0: the base's output plus exact zeros
    # base weights keep their state-dict keys
    assert "layers.0.attention.wq.weight" in m.state_dict()
    m(_batch()).sum().backward()
    assert m.layers[0].attention.wq.weight.grad is None and m.layers[0].attention.wq.lora_B.grad is not None


def test_merge_equals_adapted_forward():
    m = _model().double()  # merge is algebra: float64, agreement to its rounding
    apply_lora(m, rank=3, alpha=6, targets="all")
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.normal_(0, 0.05)
    adapted = m(_batch()).detach()
    assert merge_lora(m) == 14
    assert not any(isinstance(x, LoRALinear) for x in m.modules())
    assert all(p.requires_grad for p in m.parameters())
    torch.testing.assert_close(m(_batch()), adapted, atol=1e-12, rtol=1e-12)


def test_targets_and_errors():
    assert parse_targets("q_proj, wk ,gate_proj") == ["wq", "wk", "w1"]
    assert parse_targets("all") == ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    with pytest.raises(ValueError, match="unknown LoRA target 'qkv'"):
        parse_targets("qkv")
    with pytest.raises(ValueError, match="rank must be positive"):
        apply_lora(_model(), rank=0, alpha=1)
