"""EVA-02 (timm's Eva): a ViT whose attention rotates q and k by their patch's position (RoPE) and whose MLP is
gated (SwiGLU: fc1 gives the gate and the value, SiLU on the gate); q and v have their own biases beside a qkv
projection without one.

Quantized as the ViT: IRM sits in timm's q_norm/k_norm slots, before the rotation (where timm's own q/k norm
goes); the rotation mixes channel pairs, so q and k are quantized after it, on what the scores' MatMul takes. The
rotary table depends on the image size only: the exported graph holds it as a constant.
"""
from __future__ import annotations

from functools import cache

from ..errors import QvitError
from .base import COMMON_ARGS, DROP, Arg, Family, grid_patch_positions, register_family


@cache  # one class for good: quantize, report and isinstance checks compare classes
def _quantized_attention_class():
    import torch
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat
    from timm.models.eva import EvaAttention

    from ..layers import QuantAttentionMixin

    class QuantEvaAttention(QuantAttentionMixin, EvaAttention):
        """timm's EVA attention with explicit, quantized matmuls; IRM in its q_norm/k_norm slots."""

        def forward(self, x, rope=None, attn_mask=None, is_causal: bool = False):
            if not self.explicit:
                return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
            if attn_mask is not None or is_causal:
                raise QvitError("quantized EVA attention takes no attention mask: EVA classifiers use none")
            B, N, _ = x.shape
            gate = self.gate(x).sigmoid() if self.gate is not None else None
            if self.qkv is not None:
                q, k, v = self.heads(x)
            else:  # separate projections (qkv_fused=False)
                q, k, v = (p(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
                           for p in (self.q_proj, self.k_proj, self.v_proj))

            def rotate(q, k):  # timm's: the prefix tokens (class, registers) keep their values
                if rope is None:
                    return q, k
                npt = self.num_prefix_tokens
                return tuple(torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=self.rotate_half)],
                                       dim=2).type_as(v) for t in (q, k))

            x = self.quantized_attention(q, k, v, position=rotate)
            x = self.norm(x.transpose(1, 2).reshape(B, N, -1))
            if gate is not None:
                x = x * gate
            return self.proj_drop(self.proj(x))

    return EvaAttention, QuantEvaAttention


@register_family
class EVA(Family):
    name = "EVA"
    timm_module = "timm.models.eva"
    timm_class = "Eva"
    name_patterns = ("eva02*",)
    args = COMMON_ARGS | {
        "patch_size": Arg("size", 1, 1024), "depth": Arg("int", 1, 64), "num_heads": Arg("int", 1, 256),
        "global_pool": Arg("choice", choices=("", "avg", "avgmax", "max", "token")),
        "qkv_fused": Arg("bool"), "swiglu_mlp": Arg("bool"), "scale_mlp": Arg("bool"), "scale_attn_inner": Arg("bool"),
        "class_token": Arg("bool"), "num_reg_tokens": Arg("int", 0, 64), "no_embed_class": Arg("bool"),
        "use_abs_pos_emb": Arg("bool"), "use_rot_pos_emb": Arg("bool"), "ref_feat_shape": Arg("size", 1, 1024, nullable=True),
        "init_values": Arg("float", 0.0, 10.0, nullable=True), "use_fc_norm": Arg("bool", nullable=True),
        "dynamic_img_pad": Arg("bool"), "pos_drop_rate": DROP, "patch_drop_rate": DROP,
    }

    def attention_swaps(self) -> dict[type, type]:
        timm_class, quantized = _quantized_attention_class()
        return {timm_class: quantized}

    def head_dim(self, attention) -> int:
        return attention.head_dim

    def patch_positions(self, model):
        return grid_patch_positions(model)

    def architecture_kwargs(self, model) -> dict:
        return super().architecture_kwargs(model) | {
            "embed_dim": model.embed_dim, "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads}
