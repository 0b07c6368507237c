"""IRM variants (config.IRM_VARIANTS, layers.IRM_NORMS): 'token' (the paper's LayerNorm over head_dim), 'head'
(statistics over tokens x head_dim) and 'blend' (a learned blend from identity). Each must leave timm's maths
untouched when bypassed, survive a checkpoint, export with parity on 2,000 Fashion-MNIST test images (the default
variant on all 10,000) and build an SM89 TensorRT-RTX plan with every quantized layer on INT8. The default (DEFAULT_IRM, 'head') is what the
other export tests use (irm=True); the others are exported here."""
import onnx
import pytest
import torch

from qvit_export import QuantConfig, QvitError, calibrate, create_model, load_checkpoint, quantize, save_checkpoint
from qvit_export.config import DEFAULT_IRM, IRM_VARIANTS
from qvit_export.irm import irm_bypassed
from qvit_export.layers import IRM_NORMS
from qvit_export.onnx_export import ExportOptions, export_onnx
from qvit_export.parity import compare
from qvit_export.quantize import irm_norms, quantizers_disabled

MODELS = ["deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "test_vit"]
OTHER_VARIANTS = [v for v in IRM_VARIANTS if v != DEFAULT_IRM]  # the default's export is tested everywhere else


def test_config_names_the_variant():
    assert tuple(IRM_NORMS) == IRM_VARIANTS
    assert QuantConfig(irm=True).irm == DEFAULT_IRM and QuantConfig(irm=False).irm is False
    assert QuantConfig.from_dict(QuantConfig(irm="head").to_dict()).irm == "head"
    # a checkpoint saved before the variants existed says irm: true, which then meant the paper's form
    assert QuantConfig.from_dict(QuantConfig(irm=False).to_dict() | {"irm": True}).irm == "token"
    for bad in ("layer", 1, None):
        with pytest.raises(QvitError, match="irm=.*token, head, blend"):
            QuantConfig(irm=bad)


@pytest.mark.parametrize("name", MODELS)
def test_bypassed_variants_are_timm_bit_for_bit_and_blend_starts_there(name, photos_224):
    torch.manual_seed(0)
    fp = create_model(name).eval()
    for variant in IRM_VARIANTS:
        qm = quantize(fp, QuantConfig(w_bits=4, a_bits=4, irm=variant)).eval()
        assert {type(n).variant for _, n in irm_norms(qm)} == {variant}
        with torch.no_grad(), quantizers_disabled(qm):
            with irm_bypassed(qm):
                assert torch.equal(qm(photos_224), fp(photos_224)), variant
            if variant == "blend":  # a = 0: the converted model is the FP model as it is
                assert torch.equal(qm(photos_224), fp(photos_224))
            else:
                assert not torch.equal(qm(photos_224), fp(photos_224))


@pytest.fixture(scope="module")
def variant_students(fmnist_teacher, fmnist_calibration, fmnist_test):
    """{variant: W4A4 PTQ of the demo teacher with that IRM}, and where each starts (quantizers off) and ends
    (quantizers on), top-1 on the 10,000 test images."""
    from qvit_export.evaluation import evaluate

    out = {}
    for variant in OTHER_VARIANTS:
        qm = calibrate(quantize(fmnist_teacher, QuantConfig(w_bits=4, a_bits=4, irm=variant)), fmnist_calibration,
                       irm_steps=20, progress=False)
        with quantizers_disabled(qm):
            start = evaluate(qm, fmnist_test, progress=False)["top1"]
        out[variant] = qm, start, evaluate(qm, fmnist_test, progress=False)["top1"]
    return out


@pytest.mark.parametrize("variant", OTHER_VARIANTS)
def test_variant_exports_with_parity_and_builds_on_int8(variant, variant_students, fmnist_test, tmp_path, figures):
    from qvit_export.engine import build_engine

    qm, start, ptq = variant_students[variant]
    path = export_onnx(qm, tmp_path / f"{variant}.onnx")
    graph = onnx.load(str(path))
    norms = [n for n in graph.graph.node if n.op_type == "LayerNormalization"
             and any(i.startswith("blocks.") for i in n.input[1:])]
    report = compare(qm, path, fmnist_test.tensors[0][:2000], progress=False)  # the default variant has 10,000
    assert report.images == 2000 and report.failures() == []
    build = build_engine(path, tmp_path / f"{variant}.plan", target="tensorrt-rtx", compute_capability="sm89")
    summary = build["anatomy"]["summary"]
    assert summary["float_gemms"] == 0 and summary["unmatched"] == 0
    decomposed = export_onnx(qm, tmp_path / f"{variant}_dec.onnx", ExportOptions(decompose_layernorm=True))
    assert not any(n.op_type == "LayerNormalization" for n in onnx.load(str(decomposed)).graph.node)
    assert compare(qm, decomposed, fmnist_test.tensors[0][:2000], progress=False).failures() == []
    figures(f"IRM '{variant}' demo ViT W4A4 PTQ: starts at {start:.2f}% (quantizers off), {ptq:.2f}% quantized; "
            f"parity {report.top1_agreement:.2f}% on 2,000; SM89 plan {build['plan_bytes'] / 1e6:.2f} MB, "
            f"{summary['kernels']} kernels, 0 float GEMMs" + (f"; {len(norms)} IRM LayerNorms" if norms else ""))


def test_variant_survives_a_checkpoint(variant_students, tmp_path):
    qm, _, _ = variant_students["blend"]
    with torch.no_grad():
        for _, norm in irm_norms(qm):
            norm.blend.fill_(0.25)  # what QAT would have moved
    loaded = load_checkpoint(save_checkpoint(tmp_path / "blend.pt", qm))
    assert loaded.qvit_config.irm == "blend"
    pairs = list(zip(irm_norms(qm), irm_norms(loaded), strict=True))
    assert all(type(b) is type(a) and torch.equal(a.blend, b.blend) and b.fitted for (_, a), (_, b) in pairs)
