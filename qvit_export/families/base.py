"""What a model family is, and the registry of families.

A family is one timm architecture (a model class and the timm names that build it). Everything qvit-export needs
to know about it lives in the family's module (``families/<name>.py``), as a ``Family`` subclass registered with
``@register_family``: which attention classes become which quantized ones and their head size, the architecture
arguments a checkpoint may carry (each with its type and range: the allow-list ``model_args`` enforces), how to
read those arguments back from a model, and the layer that takes the image. The rest of the package asks the
family of a model (``family_for_model``) or of a timm name (``family_of``) and never names one.

Plain Python at import: timm and torch are imported when a family is first asked about a model.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from functools import lru_cache

from ..errors import QvitError
from ..untrusted import shown

MAX_NAME_CHARS = 200  # the longest timm model name is under 80 characters


@dataclass(frozen=True)
class Arg:
    """One argument: ``kind`` is int, float, bool, choice, size (an int or a pair of ints) or ints (a tuple of
    ints, ``length`` long at most); numbers lie in [lo, hi]; ``nullable`` also takes None."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()
    nullable: bool = False
    length: int = 0

    def describe(self) -> str:
        if self.kind == "bool":
            what = "true or false"
        elif self.kind == "choice":
            what = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "size":
            what = f"a whole number or a pair of whole numbers, {self.lo:g} to {self.hi:g}"
        elif self.kind == "ints":
            what = f"a list of 1 to {self.length} whole numbers, {self.lo:g} to {self.hi:g}"
        else:
            what = f"a {'whole ' if self.kind == 'int' else ''}number from {self.lo:g} to {self.hi:g}"
        return what + (" or null" if self.nullable else "")

    def check(self, value) -> tuple[bool, object]:
        """(whether ``value`` fits, the value normalised: lists become tuples)."""
        if value is None:
            return self.nullable, None
        if self.kind == "bool":
            return isinstance(value, bool), value
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices, value
        if self.kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            return ok and self.lo <= value <= self.hi, value
        if self.kind == "int" or (self.kind == "size" and not isinstance(value, (list, tuple))):
            return self._int(value), value
        least, most = (2, 2) if self.kind == "size" else (1, self.length)
        if not isinstance(value, (list, tuple)) or not least <= len(value) <= most:
            return False, value
        return all(map(self._int, value)), tuple(value)

    def _int(self, value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.lo <= value <= self.hi


DROP = Arg("float", 0.0, 1.0)
COMMON_ARGS = {  # what every timm vision transformer takes
    "img_size": Arg("size", 1, 4096), "in_chans": Arg("int", 1, 64), "num_classes": Arg("int", 0, 100_000),
    "embed_dim": Arg("int", 1, 8192), "mlp_ratio": Arg("float", 0.0625, 16.0), "qkv_bias": Arg("bool"),
    "dynamic_img_size": Arg("bool"), "drop_rate": DROP, "proj_drop_rate": DROP, "attn_drop_rate": DROP,
    "drop_path_rate": DROP,
}


class Family:
    """One model family. A subclass sets the class attributes and, where its models differ from the defaults
    (timm's ``patch_embed.proj`` takes the image; ``attn.num_heads`` heads over a fused ``qkv``), the methods."""

    name: str = ""  # as messages show it, e.g. "ViT/DeiT"
    timm_module: str = ""  # where timm defines the model class
    timm_class: str = ""
    name_patterns: tuple[str, ...] = ()  # what to pass timm.list_models to see the family's names
    args: dict = {}  # the architecture arguments a file may set: {name: Arg}
    input_layer_name: str = "patch_embed.proj"  # the Conv2d that takes the image
    # Submodules (by their own name, e.g. "cpb_mlp") whose layers stay in float: they compute from constants only,
    # so the exported graph folds them into one constant and a quantizer there would only add error.
    float_modules: tuple[str, ...] = ()
    # The layers kept at edge_bits when a QuantConfig leaves keep_8bit to the family (module-name prefixes): the
    # layer that takes the image and the classifier heads, as the paper keeps them.
    edge_layers: tuple[str, ...] = ("patch_embed", "head")
    # Why IRM is refused on this family (a one-line message), or None where IRM applies.
    irm_refusal: str | None = None

    def model_class(self) -> type:
        return getattr(importlib.import_module(self.timm_module), self.timm_class)

    def owns(self, model) -> bool:
        """Whether ``model`` is of this family (a subclass, such as the distilled DeiT, belongs to its base's)."""
        return isinstance(model, self.model_class())

    def attention_swaps(self) -> dict[type, type]:
        """{timm attention class: the quantized class that replaces it} (module swap: same state dict)."""
        raise NotImplementedError

    def keeps_float(self, module_name: str) -> bool:
        """Whether the layer called ``module_name`` stays unquantized (it lies inside one of ``float_modules``)."""
        return any(part in self.float_modules for part in module_name.split("."))

    def head_dim(self, attention) -> int:
        """Channels per head of one attention module."""
        return attention.qkv.out_features // 3 // attention.num_heads

    def input_layer(self, model):
        """The layer that takes the image (a Conv2d): its input channels are the model's."""
        return model.get_submodule(self.input_layer_name)

    def input_shape(self, model) -> tuple[int, int, int]:
        """(channels, height, width) of the images the model takes (224 × 224 where the model fixes no size)."""
        size = model.patch_embed.img_size
        return (self.input_layer(model).in_channels, *(size if size is not None else (224, 224)))

    def patch_positions(self, model):
        """(pixel coordinates of each patch's corner [P, 2] float64, number of prefix tokens) where every block
        attends over the whole image (attention distance is defined there); None otherwise (windowed attention)."""
        return None

    def architecture_kwargs(self, model) -> dict:
        """The timm.create_model arguments that shape ``model``, read from the model itself."""
        embed = model.patch_embed
        return {"num_classes": model.num_classes, "in_chans": self.input_layer(model).in_channels,
                "img_size": tuple(embed.img_size), "patch_size": tuple(embed.patch_size)[0]}


def grid_patch_positions(model):
    """Family.patch_positions for a model whose patch embedding lays its patches on one grid over the image
    (timm's PatchEmbed) and whose every block attends over all of them."""
    import torch

    embed = model.patch_embed
    (rows, cols), (patch_h, patch_w) = embed.grid_size, embed.patch_size
    ys, xs = torch.meshgrid(torch.arange(rows, dtype=torch.float64) * patch_h,
                            torch.arange(cols, dtype=torch.float64) * patch_w, indexing="ij")
    return torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1), int(getattr(model, "num_prefix_tokens", 1))


FAMILIES: dict[str, Family] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: add one instance of ``cls`` to FAMILIES, under its name."""
    if cls.name in FAMILIES:
        raise QvitError(f"model family {cls.name!r} is registered twice")
    FAMILIES[cls.name] = cls()
    return cls


def supported() -> str:
    """The families, as messages list them: "ViT/DeiT (timm.list_models('vit*'), ('deit*')), Swin (...)"."""
    return ", ".join(f"{f.name} (timm.list_models({', '.join(repr(p) for p in f.name_patterns)}))"
                     for f in FAMILIES.values())


def family_for_model(model, what: str | None = None) -> Family:
    """The family of a built model; QvitError naming the supported families otherwise."""
    for family in FAMILIES.values():
        if family.owns(model):
            return family
    raise QvitError(f"{what or 'the model'} is a {type(model).__name__}, which qvit-export does not support: "
                    f"pick a model of one of its families: {supported()}")


def family_of(name) -> Family:
    """The family of the timm model ``name``, from the class timm builds for it (on the meta device: nothing is
    allocated and nothing is downloaded)."""
    import timm

    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or not timm.is_model(name):
        raise QvitError(f"unknown timm model {shown(name)}: pick a name of one of qvit-export's families: "
                        f"{supported()}")
    return _family(name)


@lru_cache(maxsize=64)
def _family(name: str) -> Family:
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name)
    return family_for_model(model, f"timm model '{name}'")

