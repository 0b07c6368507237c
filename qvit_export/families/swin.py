"""Swin (timm's SwinTransformer): attention within shifted windows, with a relative position bias, and patch
merging between stages."""
from __future__ import annotations

from .base import COMMON_ARGS, Arg, Family, register_family


@register_family
class Swin(Family):
    name = "Swin"
    timm_module = "timm.models.swin_transformer"
    timm_class = "SwinTransformer"
    name_patterns = ("swin_*",)
    # window_size stays small: Swin's relative position index (not in the state dict) grows with its fourth power
    args = COMMON_ARGS | {
        "patch_size": Arg("int", 1, 1024), "depths": Arg("ints", 1, 64, length=8),
        "num_heads": Arg("ints", 1, 256, length=8), "head_dim": Arg("int", 1, 1024, nullable=True),
        "window_size": Arg("size", 1, 32), "global_pool": Arg("choice", choices=("", "avg")),
        "always_partition": Arg("bool"), "strict_img_size": Arg("bool"),
    }

    def attention_swaps(self) -> dict[type, type]:
        from timm.models.swin_transformer import WindowAttention

        from ..layers import QuantWindowAttention

        return {WindowAttention: QuantWindowAttention}

    def architecture_kwargs(self, model) -> dict:
        return super().architecture_kwargs(model) | {
            "embed_dim": model.embed_dim, "depths": tuple(len(s.blocks) for s in model.layers),
            "num_heads": tuple(s.blocks[0].attn.num_heads for s in model.layers),
            "window_size": tuple(model.layers[0].blocks[0].window_size)}
