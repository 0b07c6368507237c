"""Training recipes: YAML files in models/ (one may ``extends:`` another), command-line overrides, validation.

A recipe is a flat mapping; ``augment`` is the one nested key. Every key has a default below, so a recipe
states only what differs, and an unknown key is an error rather than a silent no-op.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

from .config import (CALIBRATION_METHODS, DEFAULT_IRM, DGD_FORMS, IRM_VARIANTS, QUANT_GROUPS, SAVED_DGD_FORM,
                     SAVED_TRUE_IRM, check_bits)
from .errors import QvitError

DEFAULTS: dict = {
    "name": None,            # the run's name (default: the recipe file's stem)
    "mode": "qat",           # fp: train a float model (a teacher); qat: quantize the teacher, calibrate, train
    "model": None,           # timm name; in QAT it must match the teacher's
    "model_kwargs": {},      # extra timm.create_model arguments (image size, classes, depth...)
    "pretrained": False,     # fp: start from timm's pretrained weights (hub download)
    "weights": None,         # fp: start from a local timm weights file
    "teacher": None,         # qat: our FP checkpoint, a timm weights file, or "pretrained" (timm hub)
    "data": "fashion-mnist", # fashion-mnist or an ImageNet-layout folder (train/ and val/)
    "train_limit": None,     # use the first N training images (quick runs and ablations)
    "val_limit": None,
    # quantization (QuantConfig) and calibration
    "w_bits": 4, "a_bits": 4, "edge_bits": 8, "irm": True, "calibration": "mse",
    "calibration_set": None, # a manifest (path or shipped name); None: draw calibration_images from the training
    "calibration_images": 1024,  # data, class-balanced, with the seed (written to the run as calibration.json)
    "irm_steps": 100,
    "quant_groups": None,    # null: every group; or a list of QUANT_GROUPS names (the bottleneck analysis quantizes
                             # one group of the blocks' quantizers at a time; such a student cannot be exported)
    # losses: CE + logit distillation from the teacher + DGD
    "label_smoothing": 0.0,
    "distill": "soft",       # none | soft (KL at temperature tau) | hard (teacher's argmax)
    "distill_weight": 0.5,   # share of the logit-distillation term (DeiT's alpha); 0.5/0.5 on a distillation token
    "distill_tau": 1.0,
    "dgd": True, "dgd_weight": 1.0,
    "dgd_form": "cosine",    # cosine | gram-row | gram (config.DGD_FORMS; distill.py has the formulas)
    # optimisation
    "optimizer": "adamw",    # adamw | lamb
    "lr": 5e-4, "min_lr": 1e-6, "weight_decay": 0.05, "warmup_epochs": 0.0,
    "step_lr_scale": 1.0,    # qat: learning rate of the LSQ steps, relative to lr
    "irm_lr_scale": 1.0,     # qat: learning rate of the IRM parameters (gamma, beta, blend), relative to lr
    "epochs": 1, "batch_size": 128,  # batch_size is global: split across torchrun processes
    "clip_grad": 1.0,        # max gradient norm; null turns clipping off
    "drop_path": 0.0,
    "amp": True,             # autocast on CUDA (ignored on the CPU)
    "amp_dtype": "bfloat16",
    "seed": 0,
    "workers": 4,            # DataLoader workers for image folders (in-memory Fashion-MNIST uses none)
    "eval_batch_size": 500,
    "augment": {},           # see AUGMENT_DEFAULTS
}

# Image folders go through timm's create_transform (these are its arguments); Fashion-MNIST uses crop + hflip.
AUGMENT_DEFAULTS = {"hflip": 0.5, "crop_padding": 2, "scale": [0.08, 1.0], "color_jitter": 0.4,
                    "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25}

CHOICES = {"mode": ("fp", "qat"), "distill": ("none", "soft", "hard"), "optimizer": ("adamw", "lamb"),
           "amp_dtype": ("bfloat16", "float16"), "calibration": CALIBRATION_METHODS, "dgd_form": DGD_FORMS}

def shipped_recipes() -> Path:
    """The recipes shipped with the package: the checkout's models/ (linked as qvit_export/recipes), package data
    in a wheel; found the same way in a checkout, an editable install and a wheel."""
    from importlib import resources

    return Path(str(resources.files("qvit_export") / "recipes"))


RECIPE_DIRS = (Path("models"), shipped_recipes())  # a user's own models/ first, then ours


def find_recipe(spec: str) -> Path:
    """A recipe path, or a name looked up as models/<name>.yaml (here, then beside the package)."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        if not path.is_file():
            raise QvitError(f"recipe not found: {path}")
        return path
    for folder in RECIPE_DIRS:
        if (folder / f"{spec}.yaml").is_file():
            return folder / f"{spec}.yaml"
    names = sorted({p.stem for d in RECIPE_DIRS if d.is_dir() for p in d.glob("*.yaml") if not p.stem.startswith("_")})
    raise QvitError(f"recipe '{spec}' not found: pass a YAML file or one of {', '.join(names) or '(none in models/)'}")


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    import yaml

    if path.resolve() in seen:
        raise QvitError(f"recipe {path} extends itself (through {' -> '.join(p.name for p in seen)})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise QvitError(f"recipe {path} is not valid YAML ({str(e).splitlines()[0]}): fix the file") from None
    if not isinstance(data, dict):
        raise QvitError(f"recipe {path} must be a mapping of keys to values")
    base = data.pop("extends", None)
    if base is None:
        return data
    merged = _read_yaml(path.parent / base, seen + (path.resolve(),))
    augment = {**merged.get("augment", {}), **data.pop("augment", {})}
    return {**merged, **data, **({"augment": augment} if augment else {})}


def parse_override(text: str) -> tuple[str, object]:
    """'key=value' with the value read as YAML (numbers, booleans, null, lists); 'augment.key=value' nests."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise QvitError(f"--set {text!r}: write key=value, e.g. --set lr=3e-4")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def apply_overrides(recipe: dict, overrides: dict) -> dict:
    out = copy.deepcopy(recipe)
    for key, value in overrides.items():
        if key.startswith("augment."):
            out.setdefault("augment", {})[key.split(".", 1)[1]] = value
        else:
            out[key] = value
    return out


def load_recipe(spec: str | None, overrides: dict | None = None) -> dict:
    """The resolved recipe: defaults, then the file chain, then overrides; validated."""
    raw = {}
    name = None
    if spec is not None:
        path = find_recipe(spec)
        raw, name = _read_yaml(path), path.stem
    recipe = apply_overrides(copy.deepcopy(DEFAULTS) | raw, overrides or {})
    recipe["name"] = recipe["name"] or name or "run"
    return validate(recipe)


def with_defaults(saved: dict) -> dict:
    """A recipe as a run saved it, with the keys added since at their defaults: the same training, so a run
    saved before a key existed is still the run of today's recipe. A QAT run saved with ``irm: true`` (before runs
    named their variant) trained SAVED_TRUE_IRM, whatever DEFAULT_IRM is now; one saved before ``dgd_form``
    existed trained SAVED_DGD_FORM, whatever the default form is now."""
    recipe = copy.deepcopy(DEFAULTS) | copy.deepcopy(saved)
    if recipe["mode"] == "qat" and recipe["irm"] is True:
        recipe["irm"] = SAVED_TRUE_IRM
    if "dgd_form" not in saved:
        recipe["dgd_form"] = SAVED_DGD_FORM
    return recipe


def validate(recipe: dict) -> dict:
    unknown = sorted(set(recipe) - set(DEFAULTS))
    if unknown:
        raise QvitError(f"unknown recipe key '{unknown[0]}': known keys are {', '.join(sorted(DEFAULTS))}")
    bad_aug = sorted(set(recipe["augment"]) - set(AUGMENT_DEFAULTS))
    if bad_aug:
        raise QvitError(f"unknown augment key '{bad_aug[0]}': known keys are {', '.join(AUGMENT_DEFAULTS)}")
    recipe["augment"] = AUGMENT_DEFAULTS | recipe["augment"]
    for key, allowed in CHOICES.items():
        if recipe[key] not in allowed:
            raise QvitError(f"{key}={recipe[key]!r} is not one of {', '.join(allowed)}")
    for key in ("w_bits", "a_bits", "edge_bits"):
        check_bits(key, recipe[key])
    for key in ("epochs", "batch_size", "calibration_images", "eval_batch_size", "seed", "irm_steps", "workers"):
        value = recipe[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key in ("seed", "irm_steps", "workers") else 1):
            raise QvitError(f"{key}={value!r} must be a whole number" + ("" if key in ("seed", "irm_steps", "workers") else " >= 1"))
    for key in ("lr", "min_lr", "weight_decay", "warmup_epochs", "step_lr_scale", "irm_lr_scale", "distill_weight",
                "distill_tau", "dgd_weight", "label_smoothing", "drop_path"):
        value = recipe[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise QvitError(f"{key}={value!r} must be a finite number >= 0")
    for key in ("dgd", "amp", "pretrained"):
        if not isinstance(recipe[key], bool):
            raise QvitError(f"{key}={recipe[key]!r} must be true or false")
    if not isinstance(recipe["irm"], bool) and recipe["irm"] not in IRM_VARIANTS:
        raise QvitError(f"irm={recipe['irm']!r} must be true ({DEFAULT_IRM}), false or one of {', '.join(IRM_VARIANTS)}")
    groups = recipe["quant_groups"]
    if groups is not None:
        groups = [groups] if isinstance(groups, str) else groups
        if not isinstance(groups, list) or not groups or any(g not in QUANT_GROUPS for g in groups) \
                or len(set(groups)) != len(groups):
            raise QvitError(f"quant_groups={recipe['quant_groups']!r} must be null (all) or a list of distinct names "
                            f"of {', '.join(QUANT_GROUPS)}")
        # one order, and null for all of them: the same training is written the same way
        recipe["quant_groups"] = None if set(groups) == set(QUANT_GROUPS) else [g for g in QUANT_GROUPS if g in groups]
    if recipe["mode"] == "qat" and recipe["irm"] is True:
        recipe["irm"] = DEFAULT_IRM  # the run records the variant it trains: a later default cannot make it stale
    clip = recipe["clip_grad"]
    if clip is not None and not (isinstance(clip, (int, float)) and not isinstance(clip, bool) and math.isfinite(clip)
                                 and clip > 0):
        raise QvitError(f"clip_grad={recipe['clip_grad']!r} must be a positive number or null")
    if recipe["calibration_set"] is not None and not isinstance(recipe["calibration_set"], str):
        raise QvitError(f"calibration_set={recipe['calibration_set']!r} must be a manifest path or a shipped name")
    if not isinstance(recipe["model_kwargs"], dict):
        raise QvitError("model_kwargs must be a mapping of timm.create_model arguments")
    if recipe["mode"] == "qat" and not recipe["teacher"]:
        raise QvitError("a QAT recipe needs a teacher: set teacher to an FP checkpoint of ours (qvit-train with "
                        "mode=fp), a timm weights file, or 'pretrained'")
    if recipe["mode"] == "fp" and not recipe["model"]:
        raise QvitError("an FP recipe needs model: a timm model name")
    return recipe


def quant_config(recipe: dict):
    from .config import QuantConfig

    groups = recipe.get("quant_groups")
    return QuantConfig(w_bits=recipe["w_bits"], a_bits=recipe["a_bits"], irm=recipe["irm"],
                       edge_bits=recipe["edge_bits"], calibration=recipe["calibration"],
                       **({"groups": tuple(groups)} if groups else {}))


def to_yaml(recipe: dict) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False)
