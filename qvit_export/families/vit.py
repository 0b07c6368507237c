"""ViT and DeiT (timm's VisionTransformer, the distilled DeiT and DINOv2-style ViTs with registers included): one
fused qkv projection per block, attention over every token."""
from __future__ import annotations

from .base import COMMON_ARGS, DROP, Arg, Family, grid_patch_positions, register_family


@register_family
class ViT(Family):
    name = "ViT/DeiT"
    timm_module = "timm.models.vision_transformer"
    timm_class = "VisionTransformer"
    name_patterns = ("vit*", "deit*")
    args = COMMON_ARGS | {
        "patch_size": Arg("size", 1, 1024), "depth": Arg("int", 1, 64), "num_heads": Arg("int", 1, 256),
        "global_pool": Arg("choice", choices=("", "avg", "avgmax", "max", "token", "map")),
        "class_token": Arg("bool"), "no_embed_class": Arg("bool"), "reg_tokens": Arg("int", 0, 64),
        "pre_norm": Arg("bool"), "final_norm": Arg("bool"), "fc_norm": Arg("bool", nullable=True),
        "qk_norm": Arg("bool"), "proj_bias": Arg("bool"), "init_values": Arg("float", 0.0, 10.0, nullable=True),
        "dynamic_img_pad": Arg("bool"), "pos_drop_rate": DROP, "patch_drop_rate": DROP,
    }

    def attention_swaps(self) -> dict[type, type]:
        from timm.layers import Attention

        from ..layers import QuantAttention

        return {Attention: QuantAttention}

    def patch_positions(self, model):
        return grid_patch_positions(model)

    def architecture_kwargs(self, model) -> dict:
        return super().architecture_kwargs(model) | {
            "embed_dim": model.embed_dim, "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads}
