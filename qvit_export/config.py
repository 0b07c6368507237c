"""Frozen settings of the quantization scheme, deployable by TensorRT by construction (docs/design.md, "The
quantization scheme")."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .errors import QvitError
from .untrusted import shown

SUPPORTED_BITS = (2, 3, 4, 8)
INT4_BLOCKS = (64, 128)  # TensorRT's documented INT4 block sizes ("Quantized types")
# How attention below 8 bits is deployed (onnx_export.ExportOptions.attention), the default first: 'fused' deploys
# the attention probabilities as 8-bit codes on their trained step (codes past the b-bit range are kept, not clamped),
# which TensorRT runs as one fused attention kernel; 'exact' keeps the trained b-bit clamp, which no fused kernel holds.
ATTENTION_MODES = ("fused", "exact")
CALIBRATION_METHODS = ("mse", "lsq", "percentile")
# IRM on q and k (layers.IRM_NORMS holds one class per name): 'token', the paper's LayerNorm over head_dim per
# token; 'head', one mean and variance per head over tokens x head_dim (an affine map of the whole head);
# 'blend', x + a*(LayerNorm(x) - x) with a learned a that starts at 0, so the model starts as the FP one.
IRM_VARIANTS = ("token", "head", "blend")
# 'head' is the default: on the Fashion-MNIST probe (benchmarks/results/ablation_long.md, 3 epochs of QAT, 2 seeds)
# it starts 0.3 points below the teacher with quantizers off ('token': 3.7) and ends level with 'token' and LSQ at
# W4A4 and ahead of both at W2A2.
DEFAULT_IRM = "head"
# What irm=True meant in files saved before they named the variant (checkpoints, a run's recipe.yaml): the paper's.
SAVED_TRUE_IRM = "token"

# Which quantizers of the transformer blocks are on, by group (the paper's bottleneck analysis quantizes one group
# at a time). 'mlp': fc1/fc2 weights and inputs; 'mhsa_weights': qkv/proj weights; 'mhsa_acts': the attention's
# own activations, q, k, v and the attention probabilities (the list of "MHSA activations");
# 'mhsa_inputs': the inputs of qkv and proj (the LayerNorm output and the attention output), kept apart so that
# "MHSA activations" means what the two matmuls of attention see and nothing else. The patch embedding and the
# head (keep_8bit) are always quantized at edge_bits. A group left out keeps its quantizers off for good: in
# training, evaluation and calibration alike (such a model is for analysis and cannot be exported).
QUANT_GROUPS = ("mlp", "mhsa_weights", "mhsa_inputs", "mhsa_acts")

# DGD's similarity matrix (distill.py says what each computes); recipe key dgd_form.
DGD_FORMS = ("cosine", "gram-row", "gram")
# What a run saved before recipes named the form trained, whatever the default is now (recipe.with_defaults).
SAVED_DGD_FORM = "cosine"


def check_bits(name: str, bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise QvitError(f"{name}={shown(bits)} is not supported: choose one of {', '.join(map(str, SUPPORTED_BITS))}")
    return bits


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Weights: symmetric, one LSQ step per output channel (or per block of inputs: ``w_block``). Activations:
    symmetric, one step per tensor,
    zero point 0, signed or unsigned as calibration finds. Layers whose module name starts with an
    entry of ``keep_8bit`` use ``edge_bits``; None (the default) means the model family's edge layers
    (``Family.edge_layers``: the patch embedding and classifier heads, as in the paper), which ``quantize`` writes
    into the model's own config (``with_edges``), so a checkpoint names them.
    """

    w_bits: int = 4
    a_bits: int = 4
    irm: bool | str = DEFAULT_IRM  # False, or an IRM variant (IRM_VARIANTS); True means DEFAULT_IRM
    edge_bits: int = 8
    keep_8bit: tuple[str, ...] | None = None
    calibration: str = "mse"
    groups: tuple[str, ...] = QUANT_GROUPS  # which block quantizers are on (QUANT_GROUPS): all by default
    # Weight steps: None, one per output channel; 64 or 128, one per block of that many inputs of each output
    # channel (lsq.PerBlock) wherever the layer can be INT4 blocks in TensorRT (lsq.block_refusal: <= 4-bit weights,
    # K a multiple of two blocks or more, an even channel count; edge layers and the rest keep one per channel).
    # Such a model deploys as INT4 with that block size (qvit-export --precision int4 --int4-block N).
    w_block: int | None = None

    def __post_init__(self):
        for f in ("w_bits", "a_bits", "edge_bits"):
            check_bits(f, getattr(self, f))
        if self.irm is True:
            object.__setattr__(self, "irm", DEFAULT_IRM)
        elif self.irm is not False and self.irm not in IRM_VARIANTS:
            raise QvitError(f"irm={shown(self.irm)} is unknown: choose false, true ({DEFAULT_IRM}) or one of "
                            f"{', '.join(IRM_VARIANTS)}")
        if self.calibration not in CALIBRATION_METHODS:
            raise QvitError(f"calibration={shown(self.calibration)} is unknown: choose one of {', '.join(CALIBRATION_METHODS)}")
        # A list from YAML or JSON is accepted (one name as a string too); a tuple keeps the config hashable.
        if self.keep_8bit is not None:
            object.__setattr__(self, "keep_8bit", self._edge_names(self.keep_8bit))
        if self.w_block is not None:
            if type(self.w_block) is not int or self.w_block not in INT4_BLOCKS:
                raise QvitError(f"w_block={shown(self.w_block)} is not an INT4 block size TensorRT documents: choose "
                                f"{' or '.join(map(str, INT4_BLOCKS))}, or null for one weight step per channel")
            if self.w_bits > 4:
                raise QvitError(f"w_block={self.w_block} is for INT4 weights but w_bits={self.w_bits}: lower w_bits to "
                                "4 or less, or set w_block null")
        groups = (self.groups,) if isinstance(self.groups, str) else self.groups
        try:
            groups = tuple(groups)
        except TypeError:
            groups = (groups,)
        unknown = [g for g in groups if g not in QUANT_GROUPS]
        if unknown or not groups or len(set(groups)) != len(groups):
            raise QvitError(f"groups={self.groups!r}: give one or more distinct quantizer groups of "
                            f"{', '.join(QUANT_GROUPS)}")
        object.__setattr__(self, "groups", tuple(g for g in QUANT_GROUPS if g in groups))  # one order: hashable

    @staticmethod
    def _edge_names(value) -> tuple[str, ...]:
        keep = (value,) if isinstance(value, str) else value
        try:
            keep = tuple(keep)
        except TypeError:
            keep = None
        if keep is None or not all(isinstance(k, str) and k for k in keep):
            raise QvitError(f"keep_8bit={shown(value)} must be a list of module names such as "
                            "['patch_embed', 'head'], or null for the model family's")
        return keep

    def with_edges(self, edge_layers: tuple[str, ...]) -> "QuantConfig":
        """This config with ``keep_8bit`` resolved: the given edge layers where it says None (the family's)."""
        return self if self.keep_8bit is not None else replace(self, keep_8bit=tuple(edge_layers))

    @property
    def all_groups(self) -> bool:
        return self.groups == QUANT_GROUPS

    def is_edge(self, module_name: str) -> bool:
        """Whether the layer is one of the first/last layers kept at ``edge_bits`` (``keep_8bit`` resolved:
        ``with_edges``)."""
        if self.keep_8bit is None:
            raise QvitError("this QuantConfig's edge layers are the model family's: resolve them with "
                            "with_edges(family.edge_layers), as quantize does")
        return any(module_name == p or module_name.startswith(p + ".") for p in self.keep_8bit)

    def bits_for(self, module_name: str) -> tuple[int, int]:
        """(weight bits, input bits) for the layer called ``module_name``."""
        return (self.edge_bits, self.edge_bits) if self.is_edge(module_name) else (self.w_bits, self.a_bits)

    def to_dict(self) -> dict:
        """The config as plain data. ``groups`` is written only when it is not all of them, so a fully quantized
        model's checkpoint and ONNX metadata read as they did before groups existed."""
        d = asdict(self)
        d["keep_8bit"] = None if self.keep_8bit is None else list(self.keep_8bit)
        if self.all_groups:
            del d["groups"]
        else:
            d["groups"] = list(self.groups)
        if self.w_block is None:  # as before blocks existed
            del d["w_block"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = [k for k in d if k not in known]
        if unknown:
            raise QvitError(f"unknown QuantConfig keys {', '.join(shown(k) for k in unknown[:3])}: known keys are "
                            f"{sorted(known)}")
        if d.get("irm") is True:  # saved before the variants existed, when IRM was the paper's alone
            d = d | {"irm": SAVED_TRUE_IRM}
        return cls(**d)
