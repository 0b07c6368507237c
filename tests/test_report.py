"""qvit-report: the counts are computed, and one layer and one attention matmul check out by hand."""
import json

from qvit_export import QuantConfig, create_model
from qvit_export.cli import _run, report_main
from qvit_export.report import report


def test_deit_tiny_w4a4_by_hand():
    r = report(create_model("deit_tiny_patch16_224"), QuantConfig(w_bits=4, a_bits=4))
    layers = {row.name: row for row in r.layers}
    qkv = layers["blocks.0.attn.qkv"]  # 197 tokens x 192 in x 576 out
    assert qkv.macs == 197 * 192 * 576 == 21_786_624
    assert qkv.ops() == 21_786_624 / 8 and qkv.bops() == 21_786_624 * 16 / 64
    qk = layers["blocks.0.attn.q@k"]  # 3 heads x 197 x 197 x 64
    assert qk.macs == 3 * 197 * 197 * 64 and qk.ops() == qk.macs / 8 and qk.bops() == qk.macs * 16 / 64
    embed = layers["patch_embed.proj"]  # kept at 8 bits: counted in full by both conventions
    assert embed.macs == 196 * 192 * 3 * 16 * 16 and embed.ops() == embed.bops() == embed.macs
    assert abs(r.flops / 1e9 - 1.254) < 0.001  # timm/DeiT's 1.3 GFLOPs (MACs of matmuls and convs)
    assert len([x for x in r.layers if x.kind == "linear"]) == 12 * 4 + 1
    fp = report(create_model("deit_tiny_patch16_224"), None)
    assert fp.ops == fp.bops == fp.flops == r.flops and fp.q_bits == fp.fp_bits
    # size: the qkv weight at 4 bits plus 576 FP32 scales instead of 576 x 192 FP32 weights
    params = sum(p.numel() for p in create_model("deit_tiny_patch16_224").parameters())
    assert r.fp_bits == 32 * params and r.q_bits < r.fp_bits / 6


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert _run(report_main, ["--model", "deit_tiny_patch16_224", "--bits", "2", "--layers", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "blocks.11.mlp.fc2" in text and "W2A2" in text
    data = json.loads(out.read_text())
    assert data["w_bits"] == 2 and len(data["layers"]) == 12 * 6 + 1 + 1
    assert _run(report_main, ["--model", "deit_tiny_patch16_224", "--w-bits", "4"]) == 2
