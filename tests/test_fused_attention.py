"""Fused attention in the plans we ship (issue: INT8 engines that beat FP16).

First the export's rules (plain graphs, fast): a clamp that cannot bind is not written, so a softmax output at 8 bits
goes straight into its QuantizeLinear; below 8 bits ``--attention fused`` deploys the attention probabilities and
the attention output's quantizer as 8-bit codes on their trained steps, and ``exact`` keeps every b-bit clamp.
Then the structural guard on real SM89 TensorRT-RTX builds at a fixed batch of 1: for the demo ViT, DeiT-Ti, Swin-T
and EVA-02 at W8A8 and W4A4, default exports in FP16, one fused attention kernel per block wherever the FP16 float
model's plan has one, and fewer bytes moved than that plan (read from the kernel listing, plan_cost.py).
"""
import math

import onnx
import pytest
import torch

from qvit_export import QuantConfig, calibrate, create_model, quantize
from qvit_export.onnx_export import ExportOptions, deployment_form, export_onnx, needs_clip, onnx_model


@pytest.mark.parametrize("qmin,qmax,scale,input_range,expected", [
    (0, 127, 0.01, (0.0, 1.0), False),        # softmax at 8 bits: [0, 1] → codes [0, 100]
    (0, 127, 0.001, (0.0, 1.0), False),       # codes past 127 saturate in QuantizeLinear as the clamp would
    (0, 15, 0.05, (0.0, 1.0), True),          # 4 bits, step 0.05: 1.0 → code 20 > 15
    (0, 15, 1 / 14.0, (0.0, 1.0), False),     # 4 bits, step 1/14: 1.0 → code 14 ≤ 15
    (0, 15, 1 / 15.5, (0.0, 1.0), True),      # on the rounding tie: written, whatever the runtime's rounding
    (-128, 127, 0.1, None, False),            # signed 8 bits: QuantizeLinear's own saturation
    (0, 127, 0.1, None, True),                # unsigned 8 bits on an unknown input: the lower clamp binds
    (-8, 7, 0.1, None, True),                 # signed 4 bits
])
def test_a_clamp_is_written_only_where_it_can_bind(qmin, qmax, scale, input_range, expected):
    assert needs_clip(qmin, qmax, scale, input_range) is expected


def _clipped(graph) -> set[str]:
    """The quantizers whose QuantizeLinear reads a Clip."""
    producers = {o: n for n in graph.graph.node for o in n.output}
    return {n.name.rsplit("/", 1)[0] for n in graph.graph.node
            if n.op_type == "QuantizeLinear" and producers.get(n.input[0]) is not None
            and producers[n.input[0]].op_type == "Clip"}


@pytest.fixture(scope="module")
def small_models():
    """{bits: the demo architecture, random init, calibrated on 64 Fashion-MNIST images} at 8 and 4 bits."""
    from qvit_export.data import fashion_mnist
    from qvit_export.demo import DEMO_KWARGS, DEMO_MODEL

    images = fashion_mnist("test", limit=64).tensors[0]
    torch.manual_seed(0)
    fp = create_model(DEMO_MODEL, **DEMO_KWARGS).eval()
    return {bits: calibrate(quantize(fp, QuantConfig(w_bits=bits, a_bits=bits, irm="head")), [images], irm_steps=0,
                            progress=False) for bits in (8, 4)}, images


def test_softmax_at_8_bits_has_no_clip_and_both_modes_are_one_graph(small_models):
    qm = small_models[0][8]
    graphs = {mode: onnx_model(qm, ExportOptions(attention=mode)) for mode in ("fused", "exact")}
    assert not any("attn_quantizer" in name for name in _clipped(graphs["fused"]))
    strip = [[(n.op_type, n.name, tuple(n.input)) for n in g.graph.node] for g in graphs.values()]
    assert strip[0] == strip[1]
    assert deployment_form(qm, ExportOptions(attention="fused")) is qm  # nothing to widen at 8 bits


def test_below_8_bits_fused_widens_two_quantizers_per_block_and_exact_none(small_models):
    qm, images = small_models[0][4], small_models[1]
    deployed = deployment_form(qm, ExportOptions(attention="fused"))
    widened = {name for name, m in deployed.named_modules() if getattr(m, "bits", None) == 8} - \
        {name for name, m in qm.named_modules() if getattr(m, "bits", None) == 8}
    blocks = [name for name, _ in qm.named_modules() if name.endswith(".attn")]
    assert widened == {f"{b}.attn_quantizer" for b in blocks} | {f"{b}.proj.input_quantizer" for b in blocks}
    assert all(deployed.get_submodule(n).step.item() == qm.get_submodule(n).step.item() for n in widened)
    assert qm.get_submodule(f"{blocks[0]}.attn_quantizer").bits == 4  # the trained model is not touched
    fused, exact = (_clipped(onnx_model(qm, ExportOptions(attention=m))) for m in ("fused", "exact"))
    assert exact - fused == widened
    assert {f"{blocks[0]}.{p}_quantizer" for p in "qkv"} <= fused  # q, k and v keep their b-bit clamps
    # the fused form differs from the trained one only where a probability passes the b-bit range
    with torch.no_grad():
        a, b = qm(images[:16]), deployed(images[:16])
    assert torch.isfinite(b).all() and (a.argmax(1) == b.argmax(1)).float().mean() >= 0.75


def test_parity_compares_the_form_the_graph_records(small_models, tmp_path):
    from qvit_export.parity import compare

    qm, images = small_models[0][4], small_models[1]
    for mode in ("fused", "exact"):
        path = export_onnx(qm, tmp_path / f"{mode}.onnx", ExportOptions(attention=mode))
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert meta["attention"] == mode
        report = compare(qm, path, images[:32], progress=False)
        assert report.weights_identical
        assert all(q.match_percent >= 99.9 and q.max_lsb <= 1 for q in report.quantizers.values()), mode


@pytest.mark.parametrize("variant", ["token", "head", "blend"])
@pytest.mark.parametrize("stats", ["layernorm", "decomposed", "fp16"])
def test_paired_irm_is_each_norm_on_its_own(variant, stats):
    """q and k normalised as one op give what their own norms give: within
    float rounding (the affine outside the normalisation, as the graph writes it), within FP16 rounding for the
    FP16 form."""
    from qvit_export.layers import IRM_NORMS
    from qvit_export.onnx_export import PairedIRM

    torch.manual_seed(0)
    q_norm, k_norm = IRM_NORMS[variant](16), IRM_NORMS[variant](16)
    for norm in (q_norm, k_norm):
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
            if variant == "blend":
                norm.blend.uniform_(0.2, 0.8)
    q, k = torch.randn(2, 3, 10, 16) * 3 + 1, torch.randn(2, 3, 10, 16) * 0.5 - 2
    dtype = torch.float16 if stats == "fp16" else torch.float32
    paired = PairedIRM(q_norm, k_norm, stats).to(dtype)
    got = paired(q.to(dtype), k.to(dtype))
    with torch.no_grad():
        want = q_norm(q), k_norm(k)
    tolerance = {"layernorm": 2e-6, "decomposed": 1e-5, "fp16": 2e-2}[stats]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype and (g.float() - w).abs().max().item() <= tolerance


def test_an_unknown_attention_mode_is_refused_in_one_line():
    from qvit_export import QvitError

    with pytest.raises(QvitError, match="attention mode 'fast' is unknown: choose one of fused, exact"):
        ExportOptions(attention="fast")


# ---- real plans --------------------------------------------------------------------------------------

def _plan(path, batch=1) -> dict:
    from qvit_export.engine import build_plan

    return build_plan(path, "tensorrt-rtx", "sm89", fixed_batch=batch, progress=False)[1]


def _fp16_plan(qm, tmp_path, name) -> dict:
    """The plan of the float model ``qm`` replaces (onnx_export.float_baseline, as --cost-batch builds it)."""
    from qvit_export.onnx_export import float_baseline
    from qvit_export.onnx_graph import save_atomic

    return _plan(save_atomic(float_baseline(qm), tmp_path / f"{name}_fp16.onnx"))


def _guard(name, quantized: dict, tmp_path, figures, max_mb_ratio: float = 1.0) -> None:
    """Each quantized model's default export in FP16 against the FP16 float model's plan, SM89, batch 1: fused
    attention wherever FP16's is, and bytes moved below ``max_mb_ratio`` times FP16's."""
    from qvit_export.anatomy import summary_line

    base = _fp16_plan(next(iter(quantized.values())), tmp_path, name)
    base_mb = base["cost"]["mb"]["total"]
    for bits, qm in quantized.items():
        path = export_onnx(qm, tmp_path / f"{name}_w{bits}.onnx", ExportOptions(dtype="fp16"))
        report = _plan(path)
        a, cost = report["anatomy"], report["cost"]
        figures(f"{name} W{bits}A{bits} int8 SM89 b1: {summary_line(a)}; {cost['mb']['total']:.1f} MB moved against "
                f"FP16's {base_mb:.1f} ({base['anatomy']['summary']['kernels']} kernels)")
        blocks = a["attention"]["blocks"]
        # at least wherever the FP16 plan fuses (Swin-T's FP16 plan at batch 1 fuses 2 of its 12 window attentions)
        assert blocks > 0 and a["attention"]["fused"] >= min(blocks, base["cost"]["fused_attention_kernels"]), \
            a["attention"]["unfused"][:3]
        assert a["summary"]["float_gemms"] == a["summary"]["unmatched"] == 0
        assert cost["mb"]["total"] < max_mb_ratio * base_mb, (cost["mb"], base_mb)


@pytest.mark.slow
def test_demo_plans_fuse_attention_and_move_less_than_fp16(small_models, tmp_path, figures):
    _guard("demo", small_models[0], tmp_path, figures)


# EVA-02 with IRM head (RoPE between IRM and the q/k quantizers) is the known gap: attention fuses 12/12, but
# its W8A8 plan moved 68.9 MB against the FP16 plan's 61.9 (174 kernels against 113; without IRM 112 kernels and
# 47.4 MB, benchmarks/results/engine_cost.md; 2026-12-08); the bound keeps
# it from getting worse until the gap is closed.
@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,max_mb_ratio", [
    ("deit_tiny_patch16_224", {}, 1.0), ("swin_tiny_patch4_window7_224", {}, 1.0),
    ("eva02_tiny_patch14_224", {"num_classes": 1000, "head_init_scale": 1.0}, 1.25)])
def test_family_plans_fuse_attention_and_move_less_than_fp16(name, kwargs, max_mb_ratio, tmp_path, figures):
    torch.manual_seed(0)
    fp = create_model(name, **kwargs).eval()
    from qvit_export.data import photo_batch

    images = photo_batch(fp)
    quantized = {bits: calibrate(quantize(fp, QuantConfig(w_bits=bits, a_bits=bits, irm="head")), [images],
                                 irm_steps=0, progress=False) for bits in (8, 4)}
    _guard(name, quantized, tmp_path, figures, max_mb_ratio)


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs", [("deit_tiny_patch16_224", {}), ("swin_tiny_patch4_window7_224", {}),
                                         ("eva02_tiny_patch14_224", {}), ("swinv2_tiny_window8_256", {}),
                                         ("vit_small_patch14_reg4_dinov2", {"img_size": 112})])
def test_static_batch_builds_for_every_family(name, kwargs, tmp_path):
    """--static-batch graphs (batch 1 in the ONNX itself) of every family build: TensorRT-RTX 1.7 stopped in its
    MHA fusion pass on them while a Clip stood before the softmax's QuantizeLinear."""
    from qvit_export.data import photo_batch
    from qvit_export.engine import build_engine

    torch.manual_seed(0)
    fp = create_model(name, **kwargs).eval()
    qm = calibrate(quantize(fp, QuantConfig(w_bits=8, a_bits=8, irm=False)), [photo_batch(fp)], irm_steps=0,
                   progress=False)
    path = export_onnx(qm, tmp_path / "static.onnx", ExportOptions(dtype="fp16", dynamic_batch=False))
    report = build_engine(path, tmp_path / "static.plan", target="tensorrt-rtx", compute_capability="sm89")
    assert report["batch"] == {"min": 1, "opt": 1, "max": 1}
    assert report["anatomy"]["attention"]["fused"] == report["anatomy"]["attention"]["blocks"] > 0
    assert math.isfinite(report["cost"]["mb"]["total"])
