"""qvit-export and qvit-eval as a user runs them, on success (failures: test_faults.py)."""
import json
import subprocess
import sys

import pytest
import torch

from qvit_export.demo import DEMO_KWARGS


def run(tool, *args, timeout=600):
    code = f"import sys; from qvit_export.cli import {tool}; sys.argv[0] = '{tool}'; {tool}()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def one_error_line(result):
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def w4a4_ckpt(fmnist_w4a4_ckpt):
    return fmnist_w4a4_ckpt


def test_export_with_engine_end_to_end(w4a4_ckpt, tmp_path):
    plan = tmp_path / "out" / "w4a4.plan"
    r = run("qvit_export", "--ckpt", w4a4_ckpt, "--engine", plan, "--precision", "int4", "--target", "tensorrt-rtx",
            "--compute-capability", "sm89", "--batch", "1,8,32", "--parity-images", 2000)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "top-1 agreement 100.000%" in r.stdout or "top-1 agreement 99.9" in r.stdout, r.stdout
    files = sorted(p.name for p in plan.parent.iterdir())
    assert files == ["w4a4.build.json", "w4a4.onnx", "w4a4.parity.json", "w4a4.plan"]
    parity = json.loads((plan.parent / "w4a4.parity.json").read_text())
    assert parity["images"] == 2000 and parity["weights_identical"]
    build = json.loads((plan.parent / "w4a4.build.json").read_text())
    assert build["batch"] == {"min": 1, "opt": 8, "max": 32} and build["qdq_layers"]
    summary = build["anatomy"]["summary"]
    assert set(summary) == {"kernels", "quantized_layers", "int8_gemms", "int4_weight_gemms", "float_gemms",
                            "weight_casts", "unmatched"}
    assert f"{summary['quantized_layers']} quantized layers -> {summary['int8_gemms']} int8 GEMMs" in r.stdout
    assert summary["weight_casts"] == 4 * DEMO_KWARGS["depth"] and summary["float_gemms"] == summary["unmatched"] == 0
    assert f"INT4 weights (block 64): {4 * DEMO_KWARGS['depth']} layers; INT8 weights: 1 layers\n  head: 8-bit weights (edge layer)" in r.stdout


def test_export_int4_weight_only_and_eval(w4a4_ckpt, tmp_path, figures):
    plan = tmp_path / "wo.plan"
    r = run("qvit_export", "--ckpt", w4a4_ckpt, "--engine", plan, "--precision", "int4-weight-only", "--dtype", "fp16",
            "--target", "tensorrt-rtx", "--compute-capability", "sm89", "--parity-images", 1000)
    assert r.returncode == 0, r.stderr[-2000:]
    anatomy = next(line for line in r.stdout.splitlines() if line.startswith("anatomy:"))
    figures(f"qvit-export --precision int4-weight-only --dtype fp16: {anatomy}")
    assert f"{4 * DEMO_KWARGS['depth']} int4-weight GEMMs" in anatomy and "0 per-inference weight casts" in anatomy
    e = run("qvit_eval", "--onnx", tmp_path / "wo.onnx", "--limit", 1000)
    assert e.returncode == 0 and "top-1" in e.stdout, e.stderr[-2000:]


def test_eval_onnx_matches_checkpoint(w4a4_ckpt, tmp_path, figures):
    onnx_path = tmp_path / "m.onnx"
    # the trained maths exactly (--attention exact); what the default fused attention changes is measured in
    # benchmarks/attention_modes.py, and parity checks either form against the model as the graph deploys it
    assert run("qvit_export", "--ckpt", w4a4_ckpt, "--onnx", onnx_path, "--no-parity", "--attention", "exact"
               ).returncode == 0
    results = {}
    for flag, src in (("--ckpt", w4a4_ckpt), ("--onnx", onnx_path)):
        r = run("qvit_eval", flag, src, "--limit", 2000, "--json", tmp_path / f"{flag[2:]}.json")
        assert r.returncode == 0, r.stderr[-2000:]
        results[flag] = json.loads((tmp_path / f"{flag[2:]}.json").read_text())
    figures(f"PyTorch {results['--ckpt']['top1']:.2f}%  ONNX Runtime {results['--onnx']['top1']:.2f}%")
    assert abs(results["--ckpt"]["top1"] - results["--onnx"]["top1"]) <= 0.1
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in one_error_line(run("qvit_eval", "--engine", tmp_path / "any.plan"))


def test_cost_batch_reads_the_plan_cost_beside_the_fp16_model(w4a4_ckpt, tmp_path):
    """--cost-batch 1 on a dynamic plan: one more build at batch 1 and the FP16 float model's at 1; the build report
    holds both costs and their ratios, and the command prints them as one line."""
    plan = tmp_path / "w4a4.plan"
    r = run("qvit_export", "--ckpt", w4a4_ckpt, "--engine", plan, "--dtype", "fp16", "--target", "tensorrt-rtx",
            "--compute-capability", "sm89", "--cost-batch", 1, "--no-parity")
    assert r.returncode == 0, r.stderr[-2000:]
    cost = json.loads(plan.with_suffix(".build.json").read_text())["cost"]
    assert cost["batch"] == 1 and cost["fused_attention_kernels"] == DEMO_KWARGS["depth"]
    assert cost["fp16"]["kernels"] > 0 and cost["vs_fp16"]["mb"] == round(cost["mb"]["total"] / cost["fp16"]["mb"]["total"], 4)
    assert cost["vs_fp16"]["mb"] < 1  # INT8 weights and a fused attention move less than the FP16 model
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("cost: "))
    assert "÷ FP16" in line and "rtx4090" in line and "l4" in line


def test_cost_batch_without_an_engine_is_refused(w4a4_ckpt, tmp_path):
    error = one_error_line(run("qvit_export", "--ckpt", w4a4_ckpt, "--onnx", tmp_path / "x.onnx", "--cost-batch", 1))
    assert error == "error: --cost-batch configures the engine build: add --engine PLAN, or drop --cost-batch"
