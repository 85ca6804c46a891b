"""LoRA adapters on the packed model's linear layers, merged back into plain weights on export.

``apply_lora`` swaps each targeted ``nn.Linear`` for a ``LoRALinear`` that keeps the frozen
base weight under the same name (so checkpoint keys of the base model do not change) and adds
``lora_A`` (r, in) and ``lora_B`` (out, r): y = x W^T + (alpha / r) * dropout(x) A^T B^T.
B starts at zero, so an adapted model starts exactly at its base. Everything else in the model
is frozen. ``merge_lora`` folds the adapters into W and restores plain ``nn.Linear`` modules,
after which the model exports like any other.

Targets name the Linear attributes of model.py (wq wk wv wo w1 w2 w3) or their HF names
(q_proj k_proj v_proj o_proj gate_proj down_proj up_proj).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llara_fast.config import opt

HF_NAMES = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
            "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class LoraConfig:
    """The [lora] section of llara_fast.finetune (and of a run's config.toml, read by io.load)."""
    rank: int = opt(0, "LoRA rank (0: full fine-tuning)")
    alpha: float = opt(32.0, "LoRA alpha (scaling alpha / rank)")
    dropout: float = opt(0.0, "dropout on the LoRA input")
    targets: str = opt("all", "comma list of wq,wk,wv,wo,w1,w2,w3 (or HF names), or all")


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 device=None, dtype=None):
        # The base weight is assigned by apply_lora (the wrapped layer's own Parameter), so it is
        # not allocated here.
        super().__init__(in_features, out_features, bias=False, device="meta", dtype=dtype)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)  # (N, out)
        low = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (N, r) -> (N, out)
        return base + self.scaling * low

    def merged_weight(self) -> torch.Tensor:
        """(out, in) W + (alpha / r) B A, in fp32 then cast back to W's dtype."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)  # fp32 at least
        delta = self.lora_B.to(acc) @ self.lora_A.to(acc)  # (out, in)
        return (self.weight.to(acc) + self.scaling * delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def parse_targets(targets: str | list[str] | tuple[str, ...]) -> list[str]:
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    names = [t for t in names if t]
    if names == ["all"]:
        return list(ALL_TARGETS)
    out = []
    for t in names:
        t = HF_NAMES.get(t, t)
        if t not in ALL_TARGETS:
            raise ValueError(f"unknown LoRA target {t!r}; choose from {', '.join(ALL_TARGETS)} "
                             f"(or their HF names {', '.join(HF_NAMES)}), or 'all'")
        out.append(t)
    if not out:
        raise ValueError("LoRA needs at least one target module")
    return out


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: str | list[str] = "all") -> int:
    """Wrap the targeted Linear layers of every block and freeze all other parameters.
    Returns the number of trainable parameters. Call before FSDP / compile."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    wanted = set(parse_targets(targets))
    for p in model.parameters():
        p.requires_grad_(False)
    swapped = 0
    for block in model.layers:
        for parent in (block.attention, block.feed_forward):
            for name, child in list(parent.named_children()):
                if name in wanted and type(child) is nn.Linear:
                    w = child.weight
                    lora = LoRALinear(child.in_features, child.out_features, rank, alpha, dropout,
                                      device=w.device, dtype=w.dtype)
                    lora.weight = w  # the same frozen Parameter, same state-dict key
                    lora.bias = child.bias  # Qwen2's q/k/v biases stay, frozen (None elsewhere)
                    setattr(parent, name, lora)
                    swapped += 1
    if swapped == 0:
        raise ValueError(f"no Linear layer matched the LoRA targets {sorted(wanted)}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRALinear into a plain nn.Linear holding W + (alpha / r) B A; unfreeze all
    parameters. Returns the number of merged layers."""
    merged = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=False,
                                device=child.weight.device, dtype=child.weight.dtype)
                lin.weight = nn.Parameter(child.merged_weight())
                lin.bias = child.bias
                setattr(module, name, lin)
                merged += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return merged
