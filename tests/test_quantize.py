"""Module swap on real timm models: exactness with quantizers off, keys, bits, gradients, calibration."""
import pytest
import torch

from family_checks import explicit_paths
from qvit_export import QuantConfig, QvitError, calibrate, create_model, quantize, quantizers, quantizers_disabled
from qvit_export.layers import IRMNorm, QuantLinear

MODELS = ["deit_tiny_patch16_224", "deit_small_distilled_patch16_224", "swin_tiny_patch4_window7_224", "test_vit"]


def _fp_and_quantized(name, irm=False):
    torch.manual_seed(0)
    fp = create_model(name).eval()
    return fp, quantize(fp, QuantConfig(w_bits=4, a_bits=4, irm=irm)).eval()


@pytest.mark.parametrize("name", MODELS)
def test_quantizers_off_is_bit_identical_to_timm(name, photos_224):
    fp, qm = _fp_and_quantized(name)
    with torch.no_grad(), quantizers_disabled(qm):
        assert torch.equal(qm(photos_224), fp(photos_224))

        # The explicit (quantizable) attention path does timm's unfused maths exactly.
        explicit_paths(fp, qm)
        assert torch.equal(qm(photos_224), fp(photos_224))


@pytest.mark.parametrize("name", MODELS)
def test_timm_state_dict_loads_into_quantized_model(name):
    fp, qm = _fp_and_quantized(name, irm=True)
    fp_keys, q_keys = set(fp.state_dict()), set(qm.state_dict())
    assert fp_keys <= q_keys  # timm's names are kept
    extra = q_keys - fp_keys
    assert extra and all(("quantizer" in k) or ("_norm." in k) for k in extra)
    other = create_model(name)
    qm.load_state_dict(other.state_dict())  # strict: a timm FP checkpoint loads as it is
    loaded = qm.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in other.state_dict().items())


def test_deit_quantizer_layout():
    _, qm = _fp_and_quantized("deit_tiny_patch16_224")
    named = dict(quantizers(qm))
    # per block: qkv, proj, fc1, fc2 (input + weight) and q, k, v, softmax; plus patch embedding and head
    assert len(named) == 12 * (4 * 2 + 4) + 2 + 2
    for name in ("patch_embed.proj.input_quantizer", "patch_embed.proj.weight_quantizer",
                 "head.input_quantizer", "head.weight_quantizer"):
        assert named[name].bits == 8
    assert named["blocks.3.mlp.fc1.weight_quantizer"].bits == 4
    assert named["blocks.3.attn.attn_quantizer"].bits == 4
    assert named["blocks.3.mlp.fc1.weight_quantizer"].step.shape == (768, 1)
    assert named["patch_embed.proj.weight_quantizer"].step.shape == (192, 1, 1, 1)
    assert named["blocks.3.attn.q_quantizer"].step.shape == ()


def test_dinov2_with_registers_is_a_vit():
    """A DINOv2-style ViT with four register tokens (at 224 here; timm's default is 518) is the ViT family's: exact
    with quantizers off on both attention paths, and its five prefix tokens kept out of the patch positions."""
    from qvit_export.families import family_for_model

    torch.manual_seed(0)
    fp = create_model("vit_small_patch14_reg4_dinov2", img_size=224).eval()
    qm = quantize(fp, QuantConfig(w_bits=4, a_bits=4, irm=False)).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), quantizers_disabled(qm):
        assert torch.equal(qm(x), fp(x))
        explicit_paths(fp, qm)
        assert torch.equal(qm(x), fp(x))
    family = family_for_model(fp)
    positions, prefix = family.patch_positions(fp)
    assert family.name == "ViT/DeiT" and prefix == 5 and positions.shape == (16 * 16, 2)


def test_distilled_and_swin_layouts():
    _, deit = _fp_and_quantized("deit_small_distilled_patch16_224")
    assert dict(quantizers(deit))["head_dist.weight_quantizer"].bits == 8
    _, swin = _fp_and_quantized("swin_tiny_patch4_window7_224", irm=True)
    names = dict(quantizers(swin))
    assert "layers.1.downsample.reduction.weight_quantizer" in names  # patch merging
    assert names["head.fc.weight_quantizer"].bits == 8
    assert isinstance(swin.layers[0].blocks[1].attn.q_norm, IRMNorm)
    assert any(b.attn_mask is not None for layer in swin.layers for b in layer.blocks)  # shifted windows exist


def test_calibration_sets_steps_and_signs_on_real_photos(photos_224):
    _, qm = _fp_and_quantized("swin_tiny_patch4_window7_224", irm=True)
    calibrate(qm, [photos_224[:9], photos_224[9:]], irm_steps=2)
    named = dict(quantizers(qm))
    assert all(q.initialized for q in named.values())
    assert all(q.scale().gt(0).all() for q in named.values())
    assert not named["layers.0.blocks.1.attn.attn_quantizer"].signed  # softmax output: unsigned
    assert named["layers.0.blocks.1.attn.q_quantizer"].signed
    assert named["layers.0.blocks.1.attn.attn_quantizer"].qmax == 15
    with torch.no_grad():
        logits = qm(photos_224)
    assert torch.isfinite(logits).all()
    # the quantized model really quantizes: its output differs from the float one
    with torch.no_grad(), quantizers_disabled(qm):
        assert not torch.equal(logits, qm(photos_224))


@pytest.mark.parametrize("method", ["mse", "lsq", "percentile"])
def test_calibration_methods_give_positive_steps(method, small_vit, fmnist_calibration):
    qm = calibrate(quantize(small_vit, QuantConfig(irm=False)), fmnist_calibration[:1], method=method)
    assert all(q.initialized and q.scale().gt(0).all() for _, q in quantizers(qm))


def test_lsq_and_percentile_rules():
    from qvit_export.calibrate import PERCENTILE, step_lsq, step_percentile

    x = torch.linspace(-3, 5, 10_001)
    assert torch.equal(step_lsq(x, 7), 2 * x.abs().mean() / 7**0.5)
    torch.testing.assert_close(step_percentile(x, 7), torch.quantile(x.abs(), PERCENTILE / 100) / 7)
    w = torch.randn(4, 50)
    assert torch.equal(step_lsq(w, 127, dim=1), 2 * w.abs().mean(dim=1) / 127**0.5)


def test_mse_step_beats_lsq_rule_on_weights(small_vit):
    from qvit_export.calibrate import step_lsq, step_mse

    w = small_vit.blocks[0].mlp.fc1.weight.detach()
    qmin, qmax = -8, 7
    err = {}
    for rule, s in (("mse", step_mse(w, qmin, qmax)), ("lsq", step_lsq(w, qmax, dim=1))):
        s = s[:, None]
        err[rule] = ((torch.clamp(torch.round(w / s), qmin, qmax) * s - w) ** 2).mean().item()
    assert err["mse"] <= err["lsq"]


def test_gradients_reach_every_weight_and_step(small_vit, fmnist_calibration):
    qm = calibrate(quantize(small_vit, QuantConfig(w_bits=4, a_bits=4, irm=True)), fmnist_calibration[:1], irm_steps=3)
    qm.train()
    x = fmnist_calibration[1][:32]
    loss = torch.nn.functional.cross_entropy(qm(x), torch.arange(32) % 10)
    loss.backward()
    missing = [n for n, p in qm.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing
    steps = [n for n, _ in qm.named_parameters() if n.endswith(".step")]
    assert len(steps) == len(list(quantizers(qm)))


def test_bad_inputs_give_one_clear_line():
    with pytest.raises(QvitError, match="unknown timm model 'deit_nonexistent'"):
        create_model("deit_nonexistent")
    resnet = create_model("resnet18")
    with pytest.raises(QvitError, match=r"is a ResNet, which qvit-export does not support: .*ViT/DeiT .*Swin"):
        quantize(resnet, QuantConfig())
    qm = quantize(create_model("test_vit"), QuantConfig())
    with pytest.raises(QvitError, match="already quantized"):
        quantize(qm, QuantConfig())
    with pytest.raises(QvitError, match="no image batches"):
        calibrate(qm, [])
    with pytest.raises(QvitError, match="calibration method"):
        calibrate(qm, [torch.randn(1, 3, 224, 224)], method="minmax")
    with pytest.raises(QvitError, match="unknown QuantConfig keys"):
        QuantConfig.from_dict({"w_bits": 4, "wbits": 3})


def test_input_model_is_left_untouched():
    fp = create_model("test_vit")
    quantize(fp, QuantConfig())
    assert not any(isinstance(m, QuantLinear) for m in fp.modules())


def test_a_step_pushed_through_zero_comes_back(small_vit, fmnist_calibration):
    """A step an optimizer update pushed below zero is put back at MIN_STEP, where its gradient is alive (at the
    forward's own floor, float32's tiny, it is zero: the channel would stay dead)."""
    from qvit_export.quantize import MIN_STEP, clamp_steps

    qm = calibrate(quantize(small_vit, QuantConfig(w_bits=4, a_bits=4, irm=False)), fmnist_calibration[:1],
                   progress=False)
    q = qm.get_submodule("blocks.0.attn.qkv.weight_quantizer")
    with torch.no_grad():
        q.step[0] = -1e-3
    qm(fmnist_calibration[0][:16]).square().mean().backward()
    assert q.step.grad[0].item() == 0  # dead where it is
    qm.zero_grad()
    clamp_steps(qm)
    assert q.step[0].item() == pytest.approx(MIN_STEP) and bool((q.step > 0).all())
    qm(fmnist_calibration[0][:16]).square().mean().backward()
    assert q.step.grad[0].item() != 0


def test_families_are_registered_adapters():
    """Each family is one registered module; a timm name finds its family from the class timm builds, and a
    model of no family is refused in one line that lists the families."""
    from qvit_export.families import FAMILIES, family_for_model, family_of

    assert list(FAMILIES) == ["ViT/DeiT", "Swin", "EVA", "Swin V2"]
    assert family_of("deit_tiny_distilled_patch16_224").name == "ViT/DeiT"  # a subclass: its base's family
    assert family_of("vit_small_patch14_reg4_dinov2").name == "ViT/DeiT"
    assert family_of("swin_tiny_patch4_window7_224").name == "Swin"
    assert family_of("eva02_tiny_patch14_224").name == "EVA"
    assert family_of("swinv2_tiny_window8_256").name == "Swin V2"
    for name in ("swinv2_cr_tiny_224", "convnext_tiny"):  # not adapted
        with pytest.raises(QvitError, match=r"which qvit-export does not support: .*ViT/DeiT .*Swin"):
            family_of(name)
    for name in ("test_vit", "swin_tiny_patch4_window7_224", "eva02_tiny_patch14_224", "swinv2_tiny_window8_256"):
        model = create_model(name)
        family = family_for_model(model)
        q = quantize(model, QuantConfig(irm=False))
        swapped = {type(m) for m in q.modules()} & set(family.attention_swaps().values())
        assert swapped == set(family.attention_swaps().values())
        assert family.input_shape(model)[0] == 3 and family.input_layer(model) is model.patch_embed.proj
        assert (family.patch_positions(model) is None) == family.name.startswith("Swin")  # windows: no image-wide distance
        # the family names its 8-bit edge layers; quantize writes them into the model's config (and checkpoint)
        assert q.qvit_config.keep_8bit == family.edge_layers
        edges = {n for n, _ in quantizers(q) if q.qvit_config.is_edge(n.rpartition(".")[0])}
        assert edges and all(qz.bits == 8 for n, qz in quantizers(q) if n in edges)
        assert {n.split(".")[0] for n in edges} == {"patch_embed", "head"} - ({"head"} if not model.num_classes else set())


def test_edge_layers_are_the_familys_unless_the_config_names_them():
    cfg = QuantConfig(w_bits=2, a_bits=2, irm=False)
    assert cfg.keep_8bit is None and cfg.to_dict()["keep_8bit"] is None
    with pytest.raises(QvitError, match="edge layers are the model family's: resolve them with with_edges"):
        cfg.is_edge("head")
    deit = quantize(create_model("deit_tiny_distilled_patch16_224"), cfg)
    assert deit.qvit_config.keep_8bit == ("patch_embed", "head", "head_dist")
    assert dict(quantizers(deit))["head_dist.weight_quantizer"].bits == 8
    only_embed = quantize(create_model("test_vit"), QuantConfig(w_bits=2, a_bits=2, irm=False, keep_8bit=["patch_embed"]))
    bits = {n: q.bits for n, q in quantizers(only_embed)}
    assert bits["patch_embed.proj.weight_quantizer"] == 8 and bits["head.weight_quantizer"] == 2
    assert only_embed.qvit_config.keep_8bit == ("patch_embed",)
