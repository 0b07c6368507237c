"""Swin V2 (timm's SwinTransformerV2): Swin's shifted windows with cosine attention (q and k normalised to unit
length per token, the scores multiplied by a learned logit scale per head) and a continuous position bias that a
small MLP (``cpb_mlp``) computes from the window's relative coordinates.

Quantized where the scores' MatMul takes its operands: the unit-length q and k (k transposed), then the logit
scale and the bias are applied to the scores as timm does. ``cpb_mlp`` stays in float: it reads constants only,
and the exported graph holds its output (16·sigmoid of the bias table) as one constant.

IRM is refused: its purpose is to give the quantized q and k a normalised distribution, and cosine attention
already gives every token's q and k length 1 (each component within [-1, 1]) right before their quantizers; a
LayerNorm before the L2 normalisation would change the angles the model was trained on, one after it would
undo the unit length the logit scale is calibrated for. Swin V2 recipes say irm: false.
"""
from __future__ import annotations

from functools import cache

from .base import COMMON_ARGS, Arg, Family, register_family


@cache  # one class for good: quantize, report and isinstance checks compare classes
def _quantized_attention_class():
    import math

    import torch
    import torch.nn.functional as F
    from timm.models.swin_transformer_v2 import WindowAttention

    from ..layers import QuantAttentionMixin

    class QuantWindowAttentionV2(QuantAttentionMixin, WindowAttention):
        """timm's Swin V2 window attention (cosine scores, continuous position bias, shifted-window mask), quantized."""

        scale = None  # the logit scale multiplies the scores instead (quantized_attention)

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            if not self.explicit:
                return super().forward(x, mask)
            B_, N, _ = x.shape
            q, k, v = self.heads(x)

            def cosine(q, k):
                return F.normalize(q, dim=-1), F.normalize(k, dim=-1)

            def add_bias(attn):  # timm's operations, in timm's order
                attn = attn * torch.clamp(self.logit_scale, max=math.log(1. / 0.01)).exp()
                table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
                bias = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous()
                attn = attn + (16 * torch.sigmoid(bias)).unsqueeze(0)
                if mask is not None:
                    num_win = mask.shape[0]
                    attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                    attn = attn.view(-1, self.num_heads, N, N)
                return attn

            x = self.quantized_attention(q, k, v, add_bias, position=cosine)
            return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, -1)))

    return WindowAttention, QuantWindowAttentionV2


@register_family
class SwinV2(Family):
    name = "Swin V2"
    timm_module = "timm.models.swin_transformer_v2"
    timm_class = "SwinTransformerV2"
    name_patterns = ("swinv2_[!c]*",)  # swinv2_cr_* is another class (SwinTransformerV2Cr), not adapted
    float_modules = ("cpb_mlp",)
    irm_refusal = ("Swin V2's cosine attention already normalises q and k (length 1 per token), which is what IRM "
                   "is for: quantize a Swin V2 model with IRM off (irm: false; no --irm)")
    # window_size stays small: the relative position index (not in the state dict) grows with its fourth power
    args = COMMON_ARGS | {
        "patch_size": Arg("int", 1, 1024), "depths": Arg("ints", 1, 64, length=8),
        "num_heads": Arg("ints", 1, 256, length=8), "window_size": Arg("size", 1, 32),
        "pretrained_window_sizes": Arg("ints", 0, 32, length=8), "global_pool": Arg("choice", choices=("", "avg")),
        "always_partition": Arg("bool"), "strict_img_size": Arg("bool"),
    }

    def attention_swaps(self) -> dict[type, type]:
        timm_class, quantized = _quantized_attention_class()
        return {timm_class: quantized}

    def architecture_kwargs(self, model) -> dict:
        # The pretrained window sizes set the relative-coordinate table (a buffer no state dict holds).
        return super().architecture_kwargs(model) | {
            "embed_dim": model.embed_dim, "depths": tuple(len(s.blocks) for s in model.layers),
            "num_heads": tuple(s.blocks[0].attn.num_heads for s in model.layers),
            "window_size": tuple(model.layers[0].blocks[0].window_size),
            "pretrained_window_sizes": tuple(s.blocks[0].attn.pretrained_window_size[0] for s in model.layers)}
