"""Fused linear + next-token cross-entropy for the LM loss (DESIGN §5).

loss = mean_i [ logsumexp(h_i @ W^T) - h_i · w_{y_i} ] over the M text positions.

The rows are processed in chunks of C so that at most (C, V) logits exist at a time,
whatever M is. Per chunk: one GEMM for the logits (tensor cores, fp32 accumulation),
then the Triton row kernel makes one online-logsumexp pass over each row and, when a
gradient is wanted, overwrites the logits in place with (softmax - onehot) / M; two more
GEMMs turn that into dH (stored) and dW (accumulated in fp32). The backward only scales
the stored gradients by the incoming scalar. Chunk counts derive from shapes alone: no
host synchronisation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llara_fast.kernels import acc_dtype, accumulate_mm_, check_dtypes, use_triton


def _empty(shape, device, dtype) -> torch.Tensor:
    """Output allocation; tests swap in a poisoning allocator to catch unwritten elements."""
    return torch.empty(shape, device=device, dtype=dtype)


@triton.jit
def _xent_rows_kernel(LOGITS, TARGETS, LOSS, stride_row, V, scale,
                      WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = LOGITS + row * stride_row
    m_run = tl.full([1], -1.0e30, tl.float32)
    s_run = tl.zeros([1], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)  # (BV,)
        m_new = tl.maximum(m_run, tl.max(x, axis=0))
        s_run = s_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m_run = m_new
    lse = m_run + tl.log(s_run)  # (1,)
    y = tl.load(TARGETS + row + tl.arange(0, 1))  # (1,)
    x_y = tl.load(base + y).to(tl.float32)
    tl.store(LOSS + row + tl.arange(0, 1), lse - x_y)
    if WRITE_GRAD:
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) * scale
            grad = tl.where(offs == y, grad - scale, grad)
            tl.store(base + offs, grad.to(LOGITS.dtype.element_ty), mask=mask)


def _xent_rows_torch(logits, targets, losses, scale: float, write_grad: bool):
    """The row kernel in plain PyTorch (CPU path), same in-place contract; in the losses' dtype
    (fp32, or float64 for float64 logits)."""
    x = logits.to(losses.dtype)  # (C, V)
    lse = torch.logsumexp(x, dim=1)  # (C,)
    losses.copy_(lse - x.gather(1, targets[:, None].long()).squeeze(1))
    if write_grad:
        g = torch.exp(x - lse[:, None]) * scale  # (C, V)
        g[torch.arange(g.shape[0], device=g.device), targets.long()] -= scale
        logits.copy_(g)


def _check(hidden, weight, targets, triton: bool):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_xent: expected hidden (M, d) and weight (V, d), got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"linear_xent: targets must be ({hidden.shape[0]},), got {tuple(targets.shape)}")
    check_dtypes("linear_xent", hidden, weight, triton)
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"linear_xent: targets must be int32/int64, got {targets.dtype}")
    if targets.device.type == "cpu" and targets.numel():  # on CUDA this would be a host sync
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"linear_xent: target id {lo if lo < 0 else hi} is outside the vocabulary "
                             f"[0, {weight.shape[0]})")


CHUNK_BUDGET_BYTES = {"cuda": 2**30, "cpu": 256 * 2**20}  # one chunk's logits, counted as fp32


def default_chunk_rows(vocab: int, rows: int, device_type: str = "cpu") -> int:
    """Rows per chunk: as few chunks as the memory budget allows (each chunk re-reads the (V, d)
    weight and accumulates the fp32 (V, d) head gradient once), of equal size. The budget bounds
    one chunk's logits counted at 4 bytes each (the CPU row pass makes fp32 temporaries of that
    size): 1 GiB on CUDA, 256 MiB elsewhere. From shapes alone, so no host synchronisation."""
    budget = CHUNK_BUDGET_BYTES.get(device_type, CHUNK_BUDGET_BYTES["cpu"])
    most = max(16, min(16384, budget // (4 * vocab)) // 16 * 16)
    n_chunks = max(1, -(-rows // most))  # ceil
    per_chunk = -(-rows // n_chunks)  # ceil: equal chunks
    return max(16, min(most, (per_chunk + 15) // 16 * 16))


def linear_xent_forward(hidden, weight, targets, chunk_rows: int | None = None, need_grad: bool = True,
                        impl: str = "auto"):
    """Returns (mean loss (), grad_hidden (M, d) or None, grad_weight fp32 (V, d) or None); the
    loss and grad_weight in float64 for float64 inputs."""
    triton_rows = use_triton(hidden.device, impl, hidden.dtype)
    _check(hidden, weight, targets, triton_rows)
    M, V = hidden.shape[0], weight.shape[0]
    chunk = chunk_rows or default_chunk_rows(V, M, hidden.device.type)
    acc = acc_dtype(hidden.dtype)
    losses = _empty((M,), device=hidden.device, dtype=acc)  # (M,)
    grad_h = _empty(hidden.shape, device=hidden.device, dtype=hidden.dtype) if need_grad else None  # (M, d)
    grad_w = None
    if need_grad:  # the first chunk overwrites it: zero-filled only when there is no chunk
        grad_w = (_empty if M else torch.zeros)(weight.shape, device=weight.device, dtype=acc)
    scale = 1.0 / max(M, 1)
    targets = targets.contiguous()
    for c0 in range(0, M, chunk):
        h = hidden[c0:c0 + chunk]  # (C, d)
        logits = h @ weight.t()  # (C, V), compute dtype, fp32 accumulation
        if triton_rows:
            _xent_rows_kernel[(h.shape[0],)](logits, targets[c0:c0 + chunk], losses[c0:c0 + chunk],
                                             logits.stride(0), V, scale, WRITE_GRAD=need_grad, BLOCK_V=1024)
        else:
            _xent_rows_torch(logits, targets[c0:c0 + chunk], losses[c0:c0 + chunk], scale, need_grad)
        if need_grad:
            grad_h[c0:c0 + chunk] = logits @ weight  # (C, d); logits now hold dL/dlogits
            accumulate_mm_(grad_w, logits.t(), h, first=c0 == 0)  # (V, d) fp32
    return losses.mean() if M else losses.sum(), grad_h, grad_w


class LinearXentFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows=None, impl="auto"):
        need = hidden.requires_grad or weight.requires_grad
        loss, grad_h, grad_w = linear_xent_forward(hidden, weight, targets, chunk_rows, need_grad=need, impl=impl)
        if need:
            ctx.save_for_backward(grad_h, grad_w)
            ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if getattr(ctx, "done", False):
            raise RuntimeError("linear_xent: backward ran twice (retain_graph); its saved gradients are consumed")
        ctx.done = True
        grad_h, grad_w = ctx.saved_tensors
        # The saved gradients are not needed after this: scale them in place (no (V, d) copy in fp32).
        grad_h.mul_(grad_loss.to(grad_h.dtype))
        grad_w.mul_(grad_loss)
        return grad_h, grad_w.to(ctx.weight_dtype), None, None, None


def linear_xent(hidden, weight, targets, chunk_rows: int | None = None, impl: str = "auto"):
    """Mean CE of (hidden @ weight^T) against targets without materialising (M, V)."""
    return LinearXentFunction.apply(hidden, weight, targets, chunk_rows, impl)
