import json

import pytest

from llara_fast.config import PRESETS, ModelArgs


def test_flop_counter_hand_count():
    a = ModelArgs(dim=4, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=2, ffn_hidden=6, vocab_size=10)
    # attention 16 + 8 + 8 + 16, MLP 3*4*6, two norms 8, final norm 4
    assert a.num_params(embedding=False) == 48 + 72 + 8 + 4
    assert a.num_params() == 132 + 2 * 40  # untied: embedding + head
    # 3 * (2*132*5 dense + 4*head_dim*heads*layers*9 pairs + 2*d*V*3 head rows)
    assert a.step_flops(n_tokens=5, attn_pairs=9, head_positions=3) == 3 * (1320 + 144 + 240)
    assert a.step_flops(5, 9, 3, backward=False) == 1704
    assert a.torchtitan_flops_per_token(seq_len=5) == 6 * (212 - 40) + 12 * 1 * 2 * 2 * 5


def test_presets_param_counts():
    # published sizes (with embeddings): SmolLM2-135M 134.5M, TinyLlama 1.1B, Llama-2-7B 6.74B, Llama-3-8B 8.03B
    assert abs(PRESETS["smollm2-135m"].num_params() - 134.5e6) < 0.5e6
    assert abs(PRESETS["tinyllama-1.1b"].num_params() - 1.100e9) < 0.01e9
    assert abs(PRESETS["llama2-7b"].num_params() - 6.738e9) < 0.01e9
    assert abs(PRESETS["llama3-8b"].num_params() - 8.030e9) < 0.01e9


def test_from_hf_config_roundtrip(tmp_path):
    a = ModelArgs.from_preset("llama3-8b", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 8192})
    (tmp_path / "config.json").write_text(json.dumps(a.to_hf_config()))
    b = ModelArgs.from_hf_config(tmp_path)
    assert b == a.__class__(**{**a.__dict__, "weights": None})


def test_from_hf_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelArgs.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"model_type .gpt2. .* is not supported; supported: llama"):
        ModelArgs.from_hf_config(tmp_path)
    with pytest.raises(KeyError, match="unknown model preset"):
        ModelArgs.from_preset("llama9")
