"""Swin (timm's SwinTransformer): attention within shifted windows, with a relative position bias, and patch
merging between stages."""
from __future__ import annotations

from functools import cache

from .base import COMMON_ARGS, Arg, Family, register_family


@cache  # one class for good: quantize, report and isinstance checks compare classes
def _quantized_attention_class():
    import torch
    from timm.models.swin_transformer import WindowAttention
    from torch import nn

    from ..layers import QuantAttentionMixin

    class QuantWindowAttention(QuantAttentionMixin, WindowAttention):
        """timm Swin window attention (relative position bias, shifted-window mask), quantized."""

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            if not self.explicit and isinstance(self.q_norm, nn.Identity):
                return super().forward(x, mask)
            B_, N, _ = x.shape
            q, k, v = self.heads(x)

            def add_bias(attn):  # the same additions, in the same order, as timm's unfused path
                attn = attn + self._get_rel_pos_bias()
                if mask is not None:
                    num_win = mask.shape[0]
                    attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                    attn = attn.view(-1, self.num_heads, N, N)
                return attn

            x = self.quantized_attention(q, k, v, add_bias)
            return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, -1)))

    return WindowAttention, QuantWindowAttention


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
        timm_class, quantized = _quantized_attention_class()
        return {timm_class: quantized}

    def architecture_kwargs(self, model) -> dict:
        return super().architecture_kwargs(model) | {
            "embed_dim": model.embed_dim, "depths": tuple(len(s.blocks) for s in model.layers),
            "num_heads": tuple(s.blocks[0].attn.num_heads for s in model.layers),
            "window_size": tuple(model.layers[0].blocks[0].window_size)}
