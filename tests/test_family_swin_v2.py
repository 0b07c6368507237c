"""Swin V2 through its family adapter (qvit_export/families/swin_v2.py): cosine attention with a learned logit
scale, a continuous position bias from a float MLP, q/v biases. Exactness against timm, IRM refused, W8A8 and
W4A4 export with parity on the photographs, an SM89 TensorRT-RTX plan."""
import pytest
import torch

from qvit_export import QuantConfig, QvitError, calibrate, create_model, quantize, quantizers, quantizers_disabled
from family_checks import assert_parity, assert_sm89_int8_plan, explicit_paths, photo_exports

NAME = "swinv2_tiny_window8_256"
BLOCKS = 2 + 2 + 6 + 2
QUANTIZED_LAYERS = 2 + 6 * BLOCKS + 3  # patch embedding, head, per block six, three patch mergings


def _pair(**kwargs):
    torch.manual_seed(0)
    fp = create_model(NAME, **kwargs).eval()
    return fp, quantize(fp, QuantConfig(w_bits=4, a_bits=4, irm=False)).eval()


@pytest.fixture(scope="module")
def photos():
    from qvit_export.data import photo_batch

    return photo_batch(create_model(NAME))


def test_swin_v2_is_a_registered_family():
    from qvit_export.families import FAMILIES, family_of

    assert "Swin V2" in FAMILIES
    assert family_of("swinv2_small_window16_256").name == "Swin V2"
    with pytest.raises(QvitError, match="does not support"):  # swinv2_cr_* is another timm class
        family_of("swinv2_cr_tiny_224")


def test_quantizers_off_equal_timm(photos):
    """Quantizers off: timm's own forward, bit for bit; the explicit (quantizable) path equals timm's to float
    rounding (q/v biases added after the qkv MatMul, as the export writes them)."""
    fp, qm = _pair()
    with torch.no_grad(), quantizers_disabled(qm):
        reference = fp(photos)
        assert torch.equal(qm(photos), reference)
        explicit_paths(fp, qm)
        assert torch.allclose(qm(photos), reference, rtol=1e-5, atol=1e-5)


def test_irm_is_refused_in_one_line():
    fp, _ = _pair()
    with pytest.raises(QvitError, match=r"cosine attention already normalises q and k") as info:
        quantize(fp, QuantConfig(irm=True))
    assert "\n" not in str(info.value)


def test_position_bias_mlp_stays_float_and_q_k_are_quantized_at_unit_length(photos):
    """cpb_mlp has no quantizer; q's quantizer sees q normalised to length 1 per token, k's sees k̂ᵀ."""
    from qvit_export.quantize import quantizer_group

    fp, qm = _pair()
    named = dict(quantizers(qm))
    assert not any("cpb_mlp" in n for n in named)
    assert len([n for n in named if n.endswith("weight_quantizer")]) == QUANTIZED_LAYERS - 2 * BLOCKS
    assert quantizer_group(qm, "layers.2.blocks.0.attn.qkv.input_quantizer") == "mhsa_inputs"
    assert quantizer_group(qm, "layers.2.blocks.0.mlp.fc1.weight_quantizer") == "mlp"
    seen = {}
    attn = qm.layers[0].blocks[0].attn
    attn.q_quantizer.register_forward_hook(lambda m, i, o: seen.setdefault("q", i[0]))
    attn.k_quantizer.register_forward_hook(lambda m, i, o: seen.setdefault("k", i[0]))
    with torch.no_grad(), quantizers_disabled(qm):
        attn.force_explicit = True
        qm(photos[:1])
    assert torch.allclose(seen["q"].norm(dim=-1), torch.ones(()), atol=1e-5)
    assert torch.allclose(seen["k"].norm(dim=-2), torch.ones(()), atol=1e-5)  # transposed: head_dim on axis -2


def test_checkpoint_round_trip_keeps_the_pretrained_window_sizes(tmp_path, photos):
    """The relative-coordinate table depends on the pretrained window sizes, which no state dict holds: the
    family reads them back from the model, so a loaded checkpoint computes the same position bias."""
    from qvit_export import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    fp = create_model(NAME, num_classes=5, depths=(1, 1, 1, 1), pretrained_window_sizes=(12, 12, 12, 6)).eval()
    qm = calibrate(quantize(fp, QuantConfig(w_bits=4, a_bits=4, irm=False)), [photos[:4]], progress=False)
    path = save_checkpoint(tmp_path / "swinv2.pt", qm)
    loaded = load_checkpoint(path)
    assert loaded.layers[3].blocks[0].attn.pretrained_window_size == (6, 6)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(photos[:4]), qm(photos[:4]))


@pytest.fixture(scope="module")
def swin_v2_exports(photos, tmp_path_factory):
    return photo_exports(NAME, {}, photos, tmp_path_factory.mktemp("swin_v2"), irm_at_4_bits=False)


@pytest.mark.slow  # exports a full-size model twice
@pytest.mark.parametrize("bits", [8, 4])
def test_export_parity_on_photographs(bits, swin_v2_exports, figures):
    assert_parity(NAME, bits, swin_v2_exports, QUANTIZED_LAYERS, figures)
    import onnx

    graph = onnx.load(str(swin_v2_exports[bits][1]))
    assert not any("cpb_mlp" in n.name for n in graph.graph.node)  # folded into a constant


@pytest.mark.slow  # exports a full-size model
def test_sm89_plan_runs_every_layer_on_int8(swin_v2_exports, tmp_path, figures):
    assert_sm89_int8_plan(NAME, swin_v2_exports[4][0], tmp_path, QUANTIZED_LAYERS, figures)


def test_weight_decay_spares_what_timm_names():
    """The trainer decays weight matrices only, sparing the parameters timm's model names: here the logit scales
    and the position-bias MLP (which quantize leaves float) beside the biases and norms."""
    from qvit_export.trainer import param_groups

    _, qm = _pair()
    decayed = {id(p) for p in param_groups(qm, 0.05, 1e-3)[0]["params"]}
    names = {name for name, p in qm.named_parameters() if id(p) in decayed}
    assert not any("logit_scale" in n or "cpb_mlp" in n for n in names)
    assert "layers.0.blocks.0.attn.qkv.weight" in names and "layers.0.blocks.0.mlp.fc1.weight" in names
