"""Parallelism applied from outside the model (torchtitan style): FSDP2, activation
checkpointing, torch.compile. The model file knows nothing of these."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from llara_fast.attention import prepare_compile

AC_MODES = ("none", "selective", "full")


def apply_fsdp(root: nn.Module, blocks: nn.ModuleList, param_dtype: torch.dtype, reduce_dtype=None,
               reshard: bool = True):
    """fully_shard each block, then the root (embedding, final norm, head and the loss that uses them).
    On GPU: bf16 parameters in compute, fp32 gradient reduction; on CPU: fp32 throughout (float64
    throughout in a float64 run). reduce_dtype None: param_dtype, fp32 at least.
    reshard=False keeps every block's gathered parameters from its forward to its backward."""
    if reduce_dtype is None:
        reduce_dtype = torch.promote_types(param_dtype, torch.float32)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward: keep them.
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard and i < len(blocks) - 1)
    fully_shard(root, mp_policy=mp)
    return root


def _checkpoint_forward(block: nn.Module) -> None:
    """Recompute the block in backward instead of keeping its activations. The instance's
    forward is replaced (hooks and state-dict keys stay as they were)."""
    inner = block.forward

    def forward(*args):
        return checkpoint(inner, *args, use_reentrant=False)

    block.forward = forward


def apply_activation_checkpointing(blocks: nn.ModuleList, mode: str) -> None:
    """"full": every block; "selective": every other block (about half the activation memory
    saved for half the recompute); "none": nothing."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing must be one of {AC_MODES}, got {mode!r}")
    if mode == "none":
        return
    for i, block in enumerate(blocks):
        if mode == "full" or i % 2 == 0:
            _checkpoint_forward(block)


def apply_compile(blocks: nn.ModuleList) -> None:
    """torch.compile each block in place (the packed attention's per-batch metadata is built
    once per step outside the blocks; the Triton attention runs untraced, as its own region)."""
    prepare_compile()
    for block in blocks:
        block.compile(dynamic=True)


def parallelize(model: nn.Module, module: nn.Module, ac: str, compile: bool, param_dtype: torch.dtype,
                reshard: bool = True) -> nn.Module:
    """The one order: activation checkpointing of the blocks, then torch.compile, then FSDP2 of
    the blocks and of ``module`` (the train module around ``model``), which is returned."""
    apply_activation_checkpointing(model.layers, ac)
    if compile:
        apply_compile(model.layers)
    return apply_fsdp(module, model.layers, param_dtype=param_dtype, reshard=reshard)
