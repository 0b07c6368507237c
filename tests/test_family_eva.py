"""EVA-02 through its family adapter (qvit_export/families/eva.py): RoPE on q and k, a gated MLP, q/v biases.
Exactness against timm, W8A8 and W4A4 export with parity on the photographs, an SM89 TensorRT-RTX plan."""
import pytest
import torch

from qvit_export import QuantConfig, calibrate, create_model, quantize, quantizers, quantizers_disabled
from family_checks import assert_parity, assert_sm89_int8_plan, explicit_paths, photo_exports
from qvit_export.layers import IRMNorm

NAME = "eva02_tiny_patch14_224"
# The MIM checkpoint of this name has no head; the fine-tuned EVA-02 have one. timm scales a fresh EVA head by
# head_init_scale=0.001, which ties random-init logits to 1e-4 (no top-1 to compare); 1.0 is DeiT's head init.
KWARGS = {"num_classes": 1000, "head_init_scale": 1.0}


def _pair(irm=False, **kwargs):
    torch.manual_seed(0)
    fp = create_model(NAME, **(KWARGS | kwargs)).eval()
    return fp, quantize(fp, QuantConfig(w_bits=4, a_bits=4, irm=irm)).eval()


@pytest.fixture(scope="module")
def photos():
    from qvit_export.data import photo_batch

    return photo_batch(create_model(NAME))


def test_eva_is_a_registered_family():
    from qvit_export.families import FAMILIES, family_of, supported

    assert "EVA" in FAMILIES and "eva02*" in supported()
    for name in ("eva02_tiny_patch14_224", "eva02_small_patch14_336", "eva02_base_patch14_448"):
        assert family_of(name).name == "EVA"


@pytest.mark.parametrize("fused", [True, False])
def test_quantizers_off_equal_timm(fused, photos):
    """Quantizers and IRM off: timm's own forward, bit for bit; the explicit (quantizable) path equals timm's
    unfused maths to float rounding (the q/v biases are added after the qkv MatMul, as the export writes them)."""
    fp, qm = _pair(qkv_fused=fused)
    with torch.no_grad(), quantizers_disabled(qm):
        reference = fp(photos)
        assert torch.equal(qm(photos), reference)
        explicit_paths(fp, qm)
        assert torch.allclose(qm(photos), fp(photos), rtol=1e-5, atol=1e-5)


def test_layout_rope_irm_and_gated_mlp(photos):
    """Every block's qkv, proj, fc1 (gate and value in one projection) and fc2 and the four attention quantizers,
    in their groups; IRM in the q/k norm slots; q's quantizer sees q rotated by RoPE and scaled."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    from qvit_export.quantize import quantizer_group

    _, qm = _pair(irm=True)
    named = dict(quantizers(qm))
    assert len(named) == 12 * (4 * 2 + 4) + 2 + 2
    assert isinstance(qm.blocks[0].attn.q_norm, IRMNorm) and isinstance(qm.blocks[0].attn.k_norm, IRMNorm)
    assert named["blocks.0.mlp.fc1.weight_quantizer"].step.shape == (1024, 1)
    assert named["patch_embed.proj.weight_quantizer"].bits == named["head.weight_quantizer"].bits == 8
    assert quantizer_group(qm, "blocks.3.mlp.fc2.input_quantizer") == "mlp"
    assert quantizer_group(qm, "blocks.3.attn.qkv.weight_quantizer") == "mhsa_weights"
    assert quantizer_group(qm, "blocks.3.attn.q_quantizer") == "mhsa_acts"

    fp, qm = _pair(irm=False)
    seen = {}
    qm.blocks[0].attn.q_quantizer.register_forward_hook(lambda m, i, o: seen.setdefault("q", i[0]))
    with torch.no_grad(), quantizers_disabled(qm):
        explicit_paths(fp, qm)
        qm(photos[:2])
        x = fp.norm_pre(fp._pos_embed(fp.patch_embed(photos[:2]))[0])
        a = fp.blocks[0].attn
        qkv = torch.nn.functional.linear(fp.blocks[0].norm1(x), a.qkv.weight, torch.cat((a.q_bias, a.k_bias, a.v_bias)))
        q = qkv.reshape(2, x.shape[1], 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)[0]
        rotated = torch.cat([q[:, :, :1], apply_rot_embed_cat(q[:, :, 1:], fp.rope.get_embed())], dim=2) * a.scale
    assert torch.allclose(seen["q"], rotated, atol=1e-5)
    assert not torch.allclose(seen["q"], q * a.scale, atol=1e-3)  # the rotation moved q


def test_checkpoint_round_trip_rebuilds_the_architecture(tmp_path, photos):
    """A quantized EVA saved and loaded rebuilds itself from the architecture arguments its family reads back,
    which pass the family's allow-list."""
    from qvit_export import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    fp = create_model(NAME, num_classes=5, depth=2).eval()
    qm = calibrate(quantize(fp, QuantConfig(w_bits=4, a_bits=4, irm=True)), [photos[:4]], irm_steps=2, progress=False)
    path = save_checkpoint(tmp_path / "eva.pt", qm)
    loaded = load_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(photos[:4]), qm(photos[:4]))


@pytest.fixture(scope="module")
def eva_exports(photos, tmp_path_factory):
    return photo_exports(NAME, KWARGS, photos, tmp_path_factory.mktemp("eva"), irm_at_4_bits=True)


@pytest.mark.slow  # exports a full-size model twice
@pytest.mark.parametrize("bits", [8, 4])
def test_export_parity_on_photographs(bits, eva_exports, figures):
    assert_parity(NAME, bits, eva_exports, 2 + 6 * 12, figures)


@pytest.mark.slow  # exports a full-size model
def test_sm89_plan_runs_every_layer_on_int8(eva_exports, tmp_path, figures):
    assert_sm89_int8_plan(NAME, eva_exports[4][0], tmp_path, 2 + 6 * 12, figures)
