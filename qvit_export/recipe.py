"""Training recipes: YAML files in models/ (one may ``extends:`` another), command-line overrides, validation, and
the typed ``Recipe`` the library trains from.

On disk a recipe is a flat mapping (``augment`` is the one nested key): every key has a default in DEFAULTS, so a
file states only what differs, and an unknown key is an error rather than a silent no-op. In memory it is a frozen
``Recipe`` whose quantization keys form a ``QuantConfig`` (``recipe.quant``) and whose augmentation is an
``Augment``; ``Recipe.to_dict`` gives back the flat mapping a run saves (recipe.yaml, the checkpoint's
extra.recipe), key for key what runs saved before the dataclass, so their runs are still reused and resumed.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

from .config import (CALIBRATION_METHODS, DEFAULT_IRM, DGD_FORMS, IRM_VARIANTS, QUANT_GROUPS, SAVED_DGD_FORM,
                     SAVED_TRUE_IRM, QuantConfig, check_bits)
from .errors import QvitError
from .untrusted import shown

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
    "w_block": None,         # null: one weight step per channel; 64 or 128: per block of inputs (INT4 export)
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
    # DGD is off unless a recipe asks: on both probes it gained nowhere (docs/results.md, "The deep probe");
    # dgd: true alone is then the paper's DGD (row-normalised Gram matrices, weight 1)
    "dgd": False, "dgd_weight": 1.0,
    "dgd_form": "gram-row",  # cosine | gram-row | gram (config.DGD_FORMS; distill.py has the formulas)
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


MAX_RECIPE_BYTES = 1 << 20  # the longest shipped recipe is under 3 KB


def _yaml_loader():
    """yaml.SafeLoader without aliases: an alias makes a reference to a node, and nested references expand
    exponentially (a few hundred bytes of anchors become gigabytes when a message or recipe.yaml writes them)."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.YAMLError(f"alias *{event.anchor[:40]} at line {event.start_mark.line + 1}: aliases are "
                                     "refused, write the value out")
            return super().compose_node(parent, index)

    return NoAliasLoader


def read_yaml_text(text: str, where: str):
    """``text`` as YAML (safe types, no aliases); one line naming ``where`` when it is not."""
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader, aliases refused
    except yaml.YAMLError as e:
        raise QvitError(f"{where} is not valid YAML ({str(e).splitlines()[0][:160]}): fix it") from None
    except RecursionError:
        raise QvitError(f"{where} is nested too deeply to be a recipe: fix it") from None


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    from .untrusted import inside, read_text

    if path.resolve() in seen:
        raise QvitError(f"recipe {path} extends itself (through {' -> '.join(p.name for p in seen)})")
    data = read_yaml_text(read_text(path, MAX_RECIPE_BYTES, "recipe"), f"recipe {path}") or {}
    if not isinstance(data, dict):
        raise QvitError(f"recipe {path} must be a mapping of keys to values")
    base = data.pop("extends", None)
    if base is None:
        return data
    # A recipe extends a recipe beside it: a name, not a path (it would read any file the recipe named).
    if not isinstance(base, str) or Path(base).name != base or base in (".", "..") \
            or not base.endswith((".yaml", ".yml")):
        raise QvitError(f"recipe {path}: extends {shown(base)} must name a .yaml recipe in the same folder")
    merged = _read_yaml(inside(path.parent, base, f"recipe {path}: extends"), seen + (path.resolve(),))
    for part in (merged, data):
        if not isinstance(part.get("augment", {}), dict):
            raise QvitError(f"recipe {path}: augment must be a mapping of augmentation keys to values")
    augment = {**merged.get("augment", {}), **data.pop("augment", {})}
    return {**merged, **data, **({"augment": augment} if augment else {})}


def parse_override(text: str) -> tuple[str, object]:
    """'key=value' with the value read as YAML (numbers, booleans, null, lists); 'augment.key=value' nests."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise QvitError(f"--set {text[:60]!r}: write key=value, e.g. --set lr=3e-4")
    try:
        return key.strip(), read_yaml_text(value, f"the value of {key.strip()[:60]}")
    except QvitError:
        return key.strip(), value


def apply_overrides(recipe: dict, overrides: dict) -> dict:
    out = copy.deepcopy(recipe)
    for key, value in overrides.items():
        if key.startswith("augment."):
            out.setdefault("augment", {})[key.split(".", 1)[1]] = value
        else:
            out[key] = value
    return out


def load_recipe(spec: str | None, overrides: dict | None = None) -> "Recipe":
    """The resolved recipe: defaults, then the file chain, then overrides (flat keys, as in a file); validated."""
    raw = {}
    name = None
    if spec is not None:
        path = find_recipe(spec)
        raw, name = _read_yaml(path), path.stem
    recipe = apply_overrides(copy.deepcopy(DEFAULTS) | raw, overrides or {})
    recipe["name"] = recipe["name"] or name or "run"
    return Recipe.from_mapping(recipe)


def with_defaults(saved: dict) -> dict:
    """A recipe as a run saved it (the flat mapping), with the keys added since at their defaults: the same
    training, so a run saved before a key existed is still the run of today's recipe. A QAT run saved with
    ``irm: true`` (before runs named their variant) trained SAVED_TRUE_IRM, whatever DEFAULT_IRM is now (an FP run
    has no IRM: ``Recipe.trains_as`` does not compare it); one saved before
    ``dgd_form`` existed trained SAVED_DGD_FORM, whatever the default form is now."""
    if not isinstance(saved, dict):
        raise QvitError("the saved recipe is not a mapping of keys to values: the checkpoint is damaged")
    recipe = copy.deepcopy(DEFAULTS) | copy.deepcopy(saved)
    if recipe["mode"] == "qat" and recipe["irm"] is True:
        recipe["irm"] = SAVED_TRUE_IRM
    if "dgd_form" not in saved:
        recipe["dgd_form"] = SAVED_DGD_FORM
    return recipe


def dgd_on(mode: str, dgd: bool, weight: float) -> bool:
    """Whether a run trains with DGD: the one rule the Trainer and Recipe.trains_as share."""
    return mode == "qat" and dgd and weight > 0


def _training(recipe: dict) -> dict:
    """A flat recipe without the keys that do not change what it trains (Recipe.trains_as)."""
    idle = (("irm",) if recipe["mode"] == "fp" else ()) + (
        () if dgd_on(recipe["mode"], recipe["dgd"], recipe["dgd_weight"]) else ("dgd", "dgd_weight", "dgd_form"))
    return {k: v for k, v in recipe.items() if k not in idle}


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a run's name is a folder name under runs/
MAX_WORKERS = 256
AUGMENT_RANGES = {"hflip": (0, 1), "re_prob": (0, 1), "color_jitter": (0, 10)}


def _number(value, lo: float, hi: float = math.inf, whole: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        return False
    return math.isfinite(value) and lo <= value <= hi


def validate(recipe: dict) -> dict:
    """The flat mapping with every key's type and range checked before any value is used or formatted (values in
    messages are cut short: untrusted.shown), normalised as a run saves it: ``Recipe.from_mapping`` builds on it."""
    unknown = [k for k in recipe if k not in DEFAULTS]
    if unknown:
        raise QvitError(f"unknown recipe key {shown(unknown[0])}: known keys are {', '.join(sorted(DEFAULTS))}")
    if not isinstance(recipe["augment"], dict):
        raise QvitError(f"augment={shown(recipe['augment'])} must be a mapping of augmentation keys to values")
    bad_aug = [k for k in recipe["augment"] if k not in AUGMENT_DEFAULTS]
    if bad_aug:
        raise QvitError(f"unknown augment key {shown(bad_aug[0])}: known keys are {', '.join(AUGMENT_DEFAULTS)}")
    recipe["augment"] = AUGMENT_DEFAULTS | recipe["augment"]
    _check_augment(recipe["augment"])
    for key, allowed in CHOICES.items():
        if not isinstance(recipe[key], str) or recipe[key] not in allowed:
            raise QvitError(f"{key}={shown(recipe[key])} is not one of {', '.join(allowed)}")
    for key in ("w_bits", "a_bits", "edge_bits"):
        check_bits(key, recipe[key])
    for key in ("epochs", "batch_size", "calibration_images", "eval_batch_size", "seed", "irm_steps", "workers"):
        lowest = 0 if key in ("seed", "irm_steps", "workers") else 1
        if not _number(recipe[key], lowest, MAX_WORKERS if key == "workers" else math.inf, whole=True):
            raise QvitError(f"{key}={shown(recipe[key])} must be a whole number" + (" >= 1" if lowest else "")
                            + (f" <= {MAX_WORKERS}" if key == "workers" else ""))
    for key in ("train_limit", "val_limit"):
        if recipe[key] is not None and not _number(recipe[key], 1, whole=True):
            raise QvitError(f"{key}={shown(recipe[key])} must be a whole number >= 1 or null")
    for key in ("lr", "min_lr", "weight_decay", "warmup_epochs", "step_lr_scale", "irm_lr_scale", "distill_weight",
                "distill_tau", "dgd_weight", "label_smoothing", "drop_path"):
        if not _number(recipe[key], 0):
            raise QvitError(f"{key}={shown(recipe[key])} must be a finite number >= 0")
    for key in ("dgd", "amp", "pretrained"):
        if not isinstance(recipe[key], bool):
            raise QvitError(f"{key}={shown(recipe[key])} must be true or false")
    if not isinstance(recipe["irm"], bool) and recipe["irm"] not in IRM_VARIANTS:
        raise QvitError(f"irm={shown(recipe['irm'])} must be true ({DEFAULT_IRM}), false or one of "
                        f"{', '.join(IRM_VARIANTS)}")
    groups = recipe["quant_groups"]
    if groups is not None:
        groups = [groups] if isinstance(groups, str) else groups
        if not isinstance(groups, list) or not groups or any(g not in QUANT_GROUPS for g in groups) \
                or len(set(groups)) != len(groups):
            raise QvitError(f"quant_groups={shown(recipe['quant_groups'])} must be null (all) or a list of distinct names "
                            f"of {', '.join(QUANT_GROUPS)}")
        # one order, and null for all of them: the same training is written the same way
        recipe["quant_groups"] = None if set(groups) == set(QUANT_GROUPS) else [g for g in QUANT_GROUPS if g in groups]
    if recipe["irm"] is True:
        recipe["irm"] = DEFAULT_IRM  # the run records the variant it trains: a later default cannot make it stale
    clip = recipe["clip_grad"]
    if clip is not None and not (_number(clip, 0) and clip > 0):
        raise QvitError(f"clip_grad={shown(clip)} must be a positive number or null")
    if recipe["name"] is not None and not (isinstance(recipe["name"], str) and NAME_PATTERN.fullmatch(recipe["name"])):
        raise QvitError(f"name={shown(recipe['name'])} must be a plain name (letters, digits, '.', '_', '-'; the run's "
                        "folder under runs/)")
    for key in ("model", "teacher", "weights", "calibration_set", "data"):
        value = recipe[key]
        if (value is not None or key == "data") and not (isinstance(value, str) and 0 < len(value) <= 4096):
            raise QvitError(f"{key}={shown(value)} must be " + ("a timm model name" if key == "model" else
                                                                 "a path or a name"))
    if not isinstance(recipe["model_kwargs"], dict):
        raise QvitError("model_kwargs must be a mapping of timm.create_model arguments")
    if recipe["mode"] == "qat" and not recipe["teacher"]:
        raise QvitError("a QAT recipe needs a teacher: set teacher to an FP checkpoint of ours (qvit-train with "
                        "mode=fp), a timm weights file, or 'pretrained'")
    if recipe["mode"] == "fp" and not recipe["model"]:
        raise QvitError("an FP recipe needs model: a timm model name")
    return recipe


def _check_augment(aug: dict) -> None:
    for key, (lo, hi) in AUGMENT_RANGES.items():
        if not (_number(aug[key], lo, hi) or (key == "color_jitter" and aug[key] is None)):
            raise QvitError(f"augment.{key}={shown(aug[key])} must be a number from {lo} to {hi}")
    if not _number(aug["crop_padding"], 0, 64, whole=True):
        raise QvitError(f"augment.crop_padding={shown(aug['crop_padding'])} must be a whole number from 0 to 64")
    scale = aug["scale"]
    if not (isinstance(scale, (list, tuple)) and len(scale) == 2 and all(_number(v, 0, 1) for v in scale)
            and 0 < scale[0] <= scale[1]):
        raise QvitError(f"augment.scale={shown(scale)} must be [low, high] with 0 < low <= high <= 1")
    policy = aug["auto_augment"]
    if policy is not None and not (isinstance(policy, str) and len(policy) <= 100):
        raise QvitError(f"augment.auto_augment={shown(policy)} must be a timm policy such as rand-m9-mstd0.5-inc1, "
                        "or null")


# The flat keys that make up Recipe.quant, by their QuantConfig field.
QUANT_KEYS = {"w_bits": "w_bits", "a_bits": "a_bits", "edge_bits": "edge_bits", "irm": "irm",
              "calibration": "calibration", "quant_groups": "groups", "w_block": "w_block"}


@dataclass(frozen=True)
class Augment:
    """Training augmentation (AUGMENT_DEFAULTS). Image folders go through timm's create_transform with all of it;
    Fashion-MNIST uses ``crop_padding`` and ``hflip``."""
    hflip: float
    crop_padding: int
    scale: tuple[float, float]
    color_jitter: float | None
    auto_augment: str | None
    re_prob: float

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """One training run's settings, validated and typed. Built by ``load_recipe`` (a file and overrides) or
    ``Recipe.from_mapping`` (a flat mapping, e.g. a saved run's); the defaults and what each key means are in
    DEFAULTS, the file format. ``quant`` holds w_bits, a_bits, edge_bits, irm, calibration, quant_groups (as
    ``groups``) and w_block."""
    name: str
    mode: str
    model: str | None
    model_kwargs: dict
    pretrained: bool
    weights: str | None
    teacher: str | None
    data: str
    train_limit: int | None
    val_limit: int | None
    quant: QuantConfig
    calibration_set: str | None
    calibration_images: int
    irm_steps: int
    label_smoothing: float
    distill: str
    distill_weight: float
    distill_tau: float
    dgd: bool
    dgd_weight: float
    dgd_form: str
    optimizer: str
    lr: float
    min_lr: float
    weight_decay: float
    warmup_epochs: float
    step_lr_scale: float
    irm_lr_scale: float
    epochs: int
    batch_size: int
    clip_grad: float | None
    drop_path: float
    amp: bool
    amp_dtype: str
    seed: int
    workers: int
    eval_batch_size: int
    augment: Augment

    @classmethod
    def from_mapping(cls, flat: dict) -> "Recipe":
        """A recipe from its flat mapping: the keys it leaves out at their defaults (DEFAULTS), the name "run" if it
        has none; ``validate`` checks and normalises every value."""
        if not isinstance(flat, dict):
            raise QvitError(f"a recipe is a mapping of keys to values, not {type(flat).__name__}: write it as "
                            "key: value lines")
        d = copy.deepcopy(DEFAULTS) | copy.deepcopy(flat)
        d["name"] = d["name"] or "run"
        d = validate(d)
        groups = d["quant_groups"]
        quant = QuantConfig(**{field: d[key] for key, field in QUANT_KEYS.items() if key != "quant_groups"},
                            **({"groups": tuple(groups)} if groups else {}))
        aug = d["augment"] | {"scale": tuple(d["augment"]["scale"])}
        rest = {k: v for k, v in d.items() if k not in QUANT_KEYS and k != "augment"}
        return cls(quant=quant, augment=Augment(**aug), **rest)

    def to_dict(self) -> dict:
        """The flat mapping, in DEFAULTS' order, as a run saves it and a file writes it."""
        quant = {key: getattr(self.quant, field) for key, field in QUANT_KEYS.items()}
        quant["quant_groups"] = None if self.quant.all_groups else list(self.quant.groups)
        out = {}
        for key in DEFAULTS:
            if key in QUANT_KEYS:
                out[key] = quant[key]
            elif key == "augment":
                out[key] = self.augment.to_dict()
            else:
                out[key] = copy.deepcopy(getattr(self, key))
        return out

    @classmethod
    def from_saved(cls, saved: dict) -> "Recipe":
        """The recipe a run saved (its recipe.yaml, its checkpoint's extra.recipe), read as today's."""
        return cls.from_mapping(with_defaults(saved))

    def trains_as(self, saved: dict) -> bool:
        """Whether a run saved with ``saved`` trained this very recipe (keys added since at their defaults). Keys
        that change nothing are not compared: an FP run has no IRM and no DGD, and a run without DGD has no DGD
        weight or form, so a later default for any of them leaves saved teachers and students valid."""
        return _training(with_defaults(saved)) == _training(self.to_dict())

    def overridden(self, overrides: dict) -> "Recipe":
        """This recipe with flat overrides (``key`` or ``augment.key``, as ``--set`` gives them), validated."""
        return Recipe.from_mapping(apply_overrides(self.to_dict(), overrides))

    @property
    def qat(self) -> bool:
        return self.mode == "qat"

    def hub_download(self) -> str | None:
        """The recipe key that asks for timm's pretrained download (a network connection), if any."""
        if self.teacher == "pretrained" and self.qat:
            return "teacher: pretrained"
        if self.pretrained and self.mode == "fp" and not self.weights:
            return "pretrained: true"
        return None

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)
