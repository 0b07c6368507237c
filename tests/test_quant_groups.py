"""Quantizer groups (QuantConfig.groups, recipe quant_groups): a group left out stays off in calibration,
training, evaluation and a saved checkpoint; the groups it keeps quantize exactly as in the full model."""
import pytest
import torch

from qvit_export import QuantConfig, QvitError, calibrate, load_checkpoint, quantize, quantizers, save_checkpoint
from qvit_export.config import QUANT_GROUPS
from qvit_export.quantize import quantizer_group, set_quantizers_enabled
from qvit_export.recipe import load_recipe, with_defaults
from qvit_export.trainer import Trainer

EXPECTED = {"mlp": {"mlp.fc1.input_quantizer", "mlp.fc1.weight_quantizer", "mlp.fc2.input_quantizer",
                    "mlp.fc2.weight_quantizer"},
            "mhsa_weights": {"attn.qkv.weight_quantizer", "attn.proj.weight_quantizer"},
            "mhsa_inputs": {"attn.qkv.input_quantizer", "attn.proj.input_quantizer"},
            "mhsa_acts": {"attn.q_quantizer", "attn.k_quantizer", "attn.v_quantizer", "attn.attn_quantizer"}}


def test_every_block_quantizer_has_one_group_and_the_edges_none(small_vit):
    model = quantize(small_vit, QuantConfig(w_bits=2, a_bits=2, irm=False))
    for name, _ in quantizers(model):
        group = quantizer_group(model, name)
        if name.startswith("blocks."):
            local = name.split(".", 2)[2]
            assert local in EXPECTED[group], name
        else:
            assert group is None and name.split(".")[0] in ("patch_embed", "head"), name
    per_block = sum(len(v) for v in EXPECTED.values())
    assert sum(1 for n, _ in quantizers(model) if n.startswith("blocks.")) == per_block * len(model.blocks)


@pytest.mark.parametrize("group", QUANT_GROUPS)
def test_a_group_alone_equals_the_full_model_with_only_that_group_on(group, small_vit, fmnist_calibration):
    """Same maths two ways: groups=(g,) against the full model with the other groups switched off by hand."""
    x = fmnist_calibration[0][:32]
    only = calibrate(quantize(small_vit, QuantConfig(w_bits=2, a_bits=2, irm=False, groups=(group,))),
                     fmnist_calibration[:1], progress=False)
    full = calibrate(quantize(small_vit, QuantConfig(w_bits=2, a_bits=2, irm=False)), fmnist_calibration[:1],
                     progress=False)
    for name, q in quantizers(full):
        q.enabled = quantizer_group(full, name) in (None, group)
    set_quantizers_enabled(only, True)  # cannot switch a left-out group on
    off = {n for n, q in quantizers(only) if not q.enabled}
    assert off == {n for n, _ in quantizers(only) if quantizer_group(only, n) not in (None, group)} and off
    with torch.no_grad():
        assert torch.equal(only(x), full(x))
        assert not torch.equal(only(x), small_vit(x))  # the group it keeps does quantize


def test_left_out_groups_stay_off_in_training_evaluation_and_a_checkpoint(fmnist_teacher, tmp_path):
    teacher = save_checkpoint(tmp_path / "teacher.pt", fmnist_teacher)
    recipe = load_recipe("demo_w4a4", {"teacher": str(teacher), "w_bits": 2, "a_bits": 2, "irm": False,
                                       "quant_groups": ["mhsa_acts"], "dgd": True, "train_limit": 128, "val_limit": 100,
                                       "batch_size": 32, "calibration_images": 64, "epochs": 1})
    assert recipe.quant.groups == ("mhsa_acts",)
    trainer = Trainer(recipe, tmp_path / "run", progress=False)
    left_out = {n: q for n, q in quantizers(trainer.model) if quantizer_group(trainer.model, n) not in (None, "mhsa_acts")}
    kept = {n: q for n, q in quantizers(trainer.model) if quantizer_group(trainer.model, n) == "mhsa_acts"}
    assert len(left_out) == 8 * len(trainer.model.blocks) and len(kept) == 4 * len(trainer.model.blocks)
    calls = {"identity": 0, "quantized": 0}

    def watch(module, inputs, output):
        if module in left_out.values():
            assert torch.equal(output, inputs[0])
            calls["identity"] += 1
        else:
            calls["quantized"] += int(not torch.equal(output, inputs[0]))

    hooks = [q.register_forward_hook(watch) for q in list(left_out.values()) + list(kept.values())]
    before = {n: q.step.detach().clone() for n, q in left_out.items()}
    trainer.run()  # epoch 0 validation, one epoch of training (DGD and distillation on), validation
    for h in hooks:
        h.remove()
    assert calls["identity"] > 0 and calls["quantized"] > 0
    assert all(torch.equal(q.step, before[n]) for n, q in left_out.items())  # no gradient ever reached them
    student = load_checkpoint(tmp_path / "run" / "best.pt")
    assert student.qvit_config.groups == ("mhsa_acts",)
    assert {n for n, q in quantizers(student) if not q.enabled} == set(left_out)
    assert "excluded" in repr(student.get_submodule(next(iter(left_out))))


def test_a_partly_quantized_model_is_refused_by_export(small_vit, fmnist_calibration, tmp_path):
    from qvit_export.onnx_export import export_onnx

    model = calibrate(quantize(small_vit, QuantConfig(w_bits=4, a_bits=4, irm=False, groups=("mlp",))),
                      fmnist_calibration[:1], progress=False)
    with pytest.raises(QvitError, match="left out by this model's quantizer groups \\(mlp\\).*export a model "
                                        "quantized in every group"):
        export_onnx(model, tmp_path / "m.onnx")


def test_group_options_and_old_runs():
    assert QuantConfig(groups=["mhsa_acts", "mlp"]).groups == ("mlp", "mhsa_acts")  # one order
    assert "groups" not in QuantConfig().to_dict()  # a full model's checkpoint and ONNX metadata are as before
    assert QuantConfig.from_dict(QuantConfig(groups=("mlp",)).to_dict()).groups == ("mlp",)
    for bad in ([], ["mlp", "mlp"], ["attention"]):
        with pytest.raises(QvitError, match="quantizer groups of mlp, mhsa_weights, mhsa_inputs, mhsa_acts"):
            QuantConfig(groups=bad)
    with pytest.raises(QvitError, match="quant_groups=\\['ffn'\\] must be null"):
        load_recipe("demo_w4a4", {"quant_groups": ["ffn"]})
    assert load_recipe("demo_w4a4", {"quant_groups": list(QUANT_GROUPS)}).to_dict()["quant_groups"] is None
    with pytest.raises(QvitError, match="dgd_form='sp' is not one of cosine, gram-row, gram"):
        load_recipe("demo_w4a4", {"dgd_form": "sp"})


def test_a_run_saved_before_dgd_forms_trained_the_cosine_form(monkeypatch):
    from qvit_export import recipe as recipes

    today = load_recipe("demo_w4a4", {"dgd": True, "dgd_form": "gram-row"})
    saved = {k: v for k, v in today.to_dict().items() if k not in ("dgd_form", "quant_groups")}
    monkeypatch.setitem(recipes.DEFAULTS, "dgd_form", "gram-row")  # whatever the default becomes
    assert with_defaults(saved)["dgd_form"] == "cosine"
    assert with_defaults(saved)["quant_groups"] is None
    assert with_defaults(today.to_dict())["dgd_form"] == "gram-row" and today.trains_as(today.to_dict())
    assert not today.trains_as(saved)  # an old DGD run is the cosine form's, not today's gram-row
