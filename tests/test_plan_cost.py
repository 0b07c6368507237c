"""Plan cost (plan_cost.py) on a stored real listing: plain Python, no GPU.

tests/data/plan_cost/deit_tiny_w4_fused_static_b1.txt is the whole ``Layers:`` message (194 KB, kept untrimmed)
that TensorRT-RTX 1.7 printed while building an SM89 plan of deit_tiny_patch16_224 W4A4 exported as int8 with
fused attention, at a static batch of 1 (no -1 dimensions): 138 kernels, 12 of them ``_gemm_mha_v2`` fused
attentions with Int8 q, kᵀ, v. tests/data/anatomy/*.layers.txt (a 2-block width-128 ViT, dynamic batch) check the
refusal of -1 dimensions and, with -1 set to a batch of 2, the convolution, the Int4-weight and the runtime-input
weight GEMMs.
"""
import dataclasses
import json
from pathlib import Path

import pytest

from qvit_export import QvitError
from qvit_export.anatomy import Kernel, Tensor, parse_layer_listing
from qvit_export.plan_cost import (DTYPE_BYTES, GPU_PROFILES, PlanCost, estimate_ms, has_unknown_dims, kernel_cost,
                                   math_dtype, plan_cost, summary_line)

DATA = Path(__file__).parent / "data"
# deit_tiny: 196 patches + cls token, width 192, 3 heads of 64, MLP 768, 12 blocks, 1000 classes
TOKENS, WIDTH, HEADS, HEAD_DIM, MLP, DEPTH, CLASSES = 197, 192, 3, 64, 768, 12, 1000


@pytest.fixture(scope="module")
def kernels():
    return parse_layer_listing((DATA / "plan_cost" / "deit_tiny_w4_fused_static_b1.txt").read_text())


@pytest.fixture(scope="module")
def cost(kernels):
    return plan_cost(kernels)


def _named(kernels, prefix):
    return next(k for k in kernels if k.name.startswith(prefix))


def test_counts_kernels_and_fused_attention(kernels, cost):
    assert not has_unknown_dims(kernels)
    assert cost.kernels == 138 and cost.fused_attention_kernels == 12
    assert len(cost.costs) == 138 and sum(1 for c in cost.costs if c.ops) == 50 + 12  # 50 gemm + 12 MHA


def test_qkv_gemm_ops_from_its_operand_dims(kernels):
    qkv = kernel_cost(_named(kernels, "blocks.0.attn.qkv/MatMul"))
    assert qkv.ops == {"Int8": 2 * TOKENS * WIDTH * 3 * WIDTH}  # 2·197·192·576
    assert qkv.input_bytes == {"Int8": TOKENS * WIDTH} and qkv.output_bytes == {"Half": 2 * TOKENS * 3 * WIDTH}
    assert qkv.constant_bytes == {"Int8": WIDTH * 3 * WIDTH, "Float": 8}  # weight + alpha, beta scalars
    head = kernel_cost(_named(kernels, "head/MatMul"))  # M = 1: the class token only
    assert head.ops == {"Int8": 2 * WIDTH * CLASSES}
    patch = kernel_cost(_named(kernels, "patch_embed.proj/MatMul"))
    assert patch.ops == {"Int8": 2 * (TOKENS - 1) * (16 * 16 * 3) * WIDTH}


def test_fused_attention_ops_count_both_matmuls(kernels):
    mha = kernel_cost(_named(kernels, "_gemm_mha_v2"))
    assert mha.fused_attention and mha.layer_type == "kgen"
    assert mha.ops == {"Int8": 2 * 2 * HEADS * TOKENS * TOKENS * HEAD_DIM}  # q·kᵀ and P·v
    assert mha.input_bytes == {"Int8": 3 * HEADS * TOKENS * HEAD_DIM} and not mha.constant_bytes


def test_memory_bound_kernels_count_no_ops(kernels):
    kgen = [kernel_cost(k) for k in kernels if k.layer_type == "kgen" and not k.fused_attention]
    assert len(kgen) == 88 - 12 and all(not c.ops and c.total_bytes > 0 for c in kgen)


def test_total_ops_are_deit_tiny_macs(cost):
    block = TOKENS * WIDTH * (3 * WIDTH + WIDTH + 2 * MLP) + 2 * HEADS * TOKENS * TOKENS * HEAD_DIM
    macs = (TOKENS - 1) * 768 * WIDTH + DEPTH * block + WIDTH * CLASSES
    assert cost.ops == {"Int8": 2 * macs}
    assert cost.gops["Int8"] == pytest.approx(2.507366, abs=1e-6)


def test_weight_bytes_are_the_constants_read(kernels, cost):
    int8_constants = sum(c.elements for k in kernels for c in k.constants if c.dtype == "Int8")
    linear_weights = 768 * WIDTH + DEPTH * WIDTH * (3 * WIDTH + WIDTH + 2 * MLP) + WIDTH * CLASSES
    assert cost.weight_bytes["Int8"] == int8_constants == linear_weights == 5_647_872
    all_constants = sum(c.elements * DTYPE_BYTES[c.dtype] for k in kernels for c in k.constants)
    assert sum(cost.weight_bytes.values()) == all_constants
    assert set(cost.weight_bytes) == {"Int8", "Half", "Float"}


def test_total_is_weights_plus_activations(kernels, cost):
    mb = cost.mb
    assert mb["total"] == pytest.approx(mb["weights"] + mb["activations"], rel=1e-12)
    every_tensor = sum(t.elements * DTYPE_BYTES[t.dtype]
                       for k in kernels for t in (*k.inputs, *k.constants, *k.outputs))
    assert mb["total"] * 1e6 == pytest.approx(every_tensor, rel=1e-12)
    # the FP32 activations: LayerNorm statistics of q/k written in Float beside the Int8 q, k, v (12 blocks)
    assert mb["fp32_activations"] * 1e6 == cost.activation_bytes["Float"] > 0
    assert 0 < mb["fp32_activations"] < mb["activations"]
    d = json.loads(json.dumps(cost.to_dict()))
    assert d["kernels"] == 138 and d["fused_attention_kernels"] == 12 and d["gops"] == {"Int8": 2.507366}
    assert set(d["estimated_ms"]) == set(GPU_PROFILES) and d["mb"]["total"] == pytest.approx(mb["total"], abs=1e-6)


def test_estimate_rises_as_bandwidth_drops(cost):
    base = GPU_PROFILES["rtx4090"]
    times = [estimate_ms(cost.costs, dataclasses.replace(base, bandwidth_gbs=bw)) for bw in (4000, 1000, 250, 60, 15)]
    assert all(a < b for a, b in zip(times, times[1:])), times
    assert cost.estimated_ms["orin-nano"] > cost.estimated_ms["agx-orin"] > cost.estimated_ms["rtx4090"]


def test_estimate_is_the_roofline_at_its_two_ends(cost):
    total = sum(c.total_bytes for c in cost.costs)
    slow_memory = dataclasses.replace(GPU_PROFILES["rtx4090"], bandwidth_gbs=1.0, launch_us=0.0)
    assert estimate_ms(cost.costs, slow_memory) == pytest.approx(total / 1e9 * 1e3, rel=1e-9)  # all memory bound
    slow_int8 = dataclasses.replace(GPU_PROFILES["rtx4090"], bandwidth_gbs=1e9, int8_tops=1e-3, launch_us=0.0)
    assert estimate_ms(cost.costs, slow_int8) == pytest.approx(cost.ops["Int8"] / 1e9 * 1e3, rel=1e-6)
    launches_only = dataclasses.replace(GPU_PROFILES["orin-nano"], bandwidth_gbs=1e12, int8_tops=1e12)
    assert estimate_ms(cost.costs, launches_only) == pytest.approx(138 * 10.0e-3, rel=1e-6)


def test_dynamic_batch_listing_is_refused_in_one_line():
    kernels = parse_layer_listing((DATA / "anatomy" / "int8.layers.txt").read_text())
    assert has_unknown_dims(kernels)
    with pytest.raises(QvitError, match="static batch") as err:
        plan_cost(kernels)
    assert "\n" not in str(err.value) and "-1" in str(err.value)


def test_unknown_datatype_is_refused_by_name(kernels):
    k = _named(kernels, "blocks.0.attn.proj/MatMul")
    odd = dataclasses.replace(k, outputs=(dataclasses.replace(k.outputs[0], dtype="Int2"),))
    with pytest.raises(QvitError, match="'Int2'.*DTYPE_BYTES"):
        kernel_cost(odd)


def test_math_datatype_rules():
    assert math_dtype(["Int8", "Int8"]) == "Int8" and math_dtype(["Int8", "Int4"]) == "Int8"
    assert math_dtype(["Half", "Int4"]) == "Half" and math_dtype(["Half", "Int8"]) == "Half"
    assert math_dtype(["Float", "Float"]) == "Float" and math_dtype(["Half", "Float"]) == "Half"
    with pytest.raises(QvitError, match="Int32"):
        math_dtype(["Int32", "Int32"])


def _at_batch(kernels, batch=2):
    def fix(tensors):
        return tuple(dataclasses.replace(t, dims=tuple(batch if d < 0 else d for d in t.dims)) for t in tensors)
    return [dataclasses.replace(k, inputs=fix(k.inputs), constants=fix(k.constants), outputs=fix(k.outputs))
            for k in kernels]


def test_other_gemm_forms_of_real_listings():
    """Conv (correlation), a weight that arrives as a runtime input (Int4→Int8 cast kernel before it), an Int4
    weight under a Half activation (runtime_fusion, weight-only: Half math) and a Half fused attention."""
    int8 = _at_batch(parse_layer_listing((DATA / "anatomy" / "int8.layers.txt").read_text()))
    conv = kernel_cost(_named(int8, "patch_embed.proj/Conv"))  # [2,4,28,28] * [128,4,4,4] -> [2,128,7,7]
    assert conv.ops == {"Int8": 2 * (2 * 128 * 7 * 7) * (4 * 4 * 4)}
    scores = kernel_cost(_named(int8, "blocks.0.attn/scores"))  # [2,50,32]·[2,32,50]
    assert scores.ops == {"Int8": 2 * (2 * 50 * 50) * 32}
    int4 = _at_batch(parse_layer_listing((DATA / "anatomy" / "int4.layers.txt").read_text()))
    qkv = kernel_cost(_named(int4, "blocks.0.attn.qkv/MatMul"))  # weight [128,384] as the second runtime input
    assert qkv.ops == {"Int8": 2 * (2 * 384) * 128} and not qkv.constant_bytes.get("Int8")
    wo = _at_batch(parse_layer_listing((DATA / "anatomy" / "int4-weight-only.layers.txt").read_text()))
    fc2 = kernel_cost(_named(wo, "__myl_ReplCastMulCastFc_myl0_13"))  # Half [2,512] x Int4 [512,128] (+ scales)
    assert fc2.ops == {"Half": 2 * (2 * 128) * 512} and fc2.constant_bytes["Int4"] == 512 * 128 / 2
    mha = kernel_cost(_named(wo, "_gemm_mha_v2"))
    assert mha.ops == {"Half": 2 * 2 * 2 * 50 * 50 * 32}
    assert plan_cost(wo).ops["Half"] > 0


def test_gemm_whose_operands_do_not_multiply_is_refused():
    bad = Kernel("odd/MatMul", "gemm", (Tensor("a", (4, 5), "Int8"),), (Tensor("w", (6, 7), "Int8"),),
                 (Tensor("o", (4, 7), "Half"),), "", ())
    with pytest.raises(QvitError, match="contracted dimension"):
        kernel_cost(bad)


def test_every_profile_is_sourced_and_positive():
    assert {"orin-nano", "agx-orin", "rtx4090", "l4", "rtx5090", "t4"} <= set(GPU_PROFILES)
    for name, p in GPU_PROFILES.items():
        assert p.bandwidth_gbs > 0 and p.int8_tops > 0 and p.fp16_tflops > 0 and p.fp32_tflops > 0, name
        assert p.launch_us > 0 and len(p.source) > 40 and p.compute_capability.startswith("sm"), name
        assert p.int8_tops >= p.fp16_tflops > p.fp32_tflops, name
        assert p.to_dict()["compute_capability"] == p.compute_capability
    assert GPU_PROFILES["orin-nano"].int8_tops == 67 / 2 and GPU_PROFILES["orin-nano"].compute_capability == "sm86"
    assert (GPU_PROFILES["t4"].int8_tops, GPU_PROFILES["t4"].fp16_tflops, GPU_PROFILES["t4"].bandwidth_gbs) == \
        (130, 65, 320)
    with pytest.raises(QvitError, match="Int32"):
        GPU_PROFILES["t4"].peak_ops("Int32")


def test_summary_line_with_fp16_ratios(cost):
    line = summary_line(cost)
    assert "\n" not in line and "138 kernels (12 fused attention)" in line and "43.77 MB moved" in line
    assert f"orin-nano {cost.estimated_ms['orin-nano']:.3f} ms" in line and "÷ FP16" not in line
    double = dataclasses.replace(cost, weight_bytes={d: 2 * b for d, b in cost.weight_bytes.items()},
                                 input_bytes={d: 2 * b for d, b in cost.input_bytes.items()},
                                 output_bytes={d: 2 * b for d, b in cost.output_bytes.items()},
                                 estimated_ms={p: 4 * ms for p, ms in cost.estimated_ms.items()})
    assert isinstance(double, PlanCost)
    line = summary_line(cost, profiles=("rtx4090",), fp16=double)
    assert "MB moved (÷ FP16 0.50)" in line and "ms (÷ FP16 0.25)" in line
    # a build report stores to_dict(); cli.py passes (cost, fp16, profiles) positionally
    assert summary_line(json.loads(json.dumps(cost.to_dict())), double.to_dict(), ("rtx4090",)) == line
    with pytest.raises(QvitError, match="h100"):
        summary_line(cost, profiles=("h100",))
