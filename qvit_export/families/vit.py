"""ViT and DeiT (timm's VisionTransformer, the distilled DeiT and DINOv2-style ViTs with registers included): one
fused qkv projection per block, attention over every token."""
from __future__ import annotations

from functools import cache

from .base import COMMON_ARGS, DROP, Arg, Family, grid_patch_positions, register_family


@cache  # one class for good: quantize, report and isinstance checks compare classes
def _quantized_attention_class():
    import torch
    from timm.layers import Attention

    from ..errors import QvitError
    from ..layers import QuantAttentionMixin

    class QuantAttention(QuantAttentionMixin, Attention):
        """timm ViT/DeiT attention with explicit, quantized matmuls; IRM in timm's q_norm/k_norm slots."""

        def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
            if not self.explicit:
                return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
            if attn_mask is not None or is_causal:
                raise QvitError("quantized ViT attention takes no attention mask: ViT/DeiT classifiers use none")
            B, N, _ = x.shape
            gate = self.gate(x).sigmoid() if self.gate is not None else None
            q, k, v = self.heads(x)
            x = self.quantized_attention(q, k, v)
            x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
            if gate is not None:
                x = x * gate
            return self.proj_drop(self.proj(x))

    return Attention, QuantAttention


@register_family
class ViT(Family):
    name = "ViT/DeiT"
    timm_module = "timm.models.vision_transformer"
    timm_class = "VisionTransformer"
    name_patterns = ("vit*", "deit*")
    edge_layers = ("patch_embed", "head", "head_dist")  # DeiT's distillation head too
    args = COMMON_ARGS | {
        "patch_size": Arg("size", 1, 1024), "depth": Arg("int", 1, 64), "num_heads": Arg("int", 1, 256),
        "global_pool": Arg("choice", choices=("", "avg", "avgmax", "max", "token", "map")),
        "class_token": Arg("bool"), "no_embed_class": Arg("bool"), "reg_tokens": Arg("int", 0, 64),
        "pre_norm": Arg("bool"), "final_norm": Arg("bool"), "fc_norm": Arg("bool", nullable=True),
        "qk_norm": Arg("bool"), "proj_bias": Arg("bool"), "init_values": Arg("float", 0.0, 10.0, nullable=True),
        "dynamic_img_pad": Arg("bool"), "pos_drop_rate": DROP, "patch_drop_rate": DROP,
    }

    def attention_swaps(self) -> dict[type, type]:
        timm_class, quantized = _quantized_attention_class()
        return {timm_class: quantized}

    def patch_positions(self, model):
        return grid_patch_positions(model)

    def architecture_kwargs(self, model) -> dict:
        return super().architecture_kwargs(model) | {
            "embed_dim": model.embed_dim, "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads}
