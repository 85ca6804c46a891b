"""benchmarks/profile_breakdown.py: kernel and operator names land in the issue's groups, and a
profiled CPU step's groups are those of the operators it ran."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from profile_breakdown import GROUPS, classify, format_breakdown, profile_step  # noqa: E402


@pytest.mark.parametrize("name,group", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NTN", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_s16816gemm_bf16_128x64_64x3_nn_align8>", "gemm"),
    ("aten::mm", "gemm"), ("aten::addmm", "gemm"),
    ("flash_fwd_kernel", "attention"), ("fmha_cutlassB_bf16_aligned_64x64_k128", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("_xent_rows_kernel", "loss"), ("_bow_fwd_kernel", "loss"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("aten::_fused_adamw_", "optimizer"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "fsdp_copies"),
    ("Memcpy DtoD (Device -> Device)", "fsdp_copies"), ("aten::copy_", "fsdp_copies"),
    ("triton_poi_fused_mul_rsqrt_0", "elementwise"), ("aten::mul", "elementwise"),
])
def test_classify(name, group):
    assert classify(name) == group


def test_cpu_step_groups():
    lin = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(lin.parameters(), fused=True)
    x = torch.randn(128, 64)

    def step():
        q = lin(x)[None, None]  # (1, 1, 128, 64)
        torch.nn.functional.scaled_dot_product_attention(q, q, q).square().mean().backward()
        opt.step()
        opt.zero_grad()

    step()
    r = profile_step(step, torch.device("cpu"))
    g = r["groups_ms"]
    assert set(g) == set(GROUPS) and r["idle_ms"] is None
    assert g["gemm"] > 0 and g["attention"] > 0 and g["optimizer"] > 0 and g["loss"] == 0
    assert "aten::addmm" in [k for _, k in r["top"]["gemm"]]
    assert "wall" in format_breakdown(r)
