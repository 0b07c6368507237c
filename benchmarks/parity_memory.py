"""Parity memory benchmark: peak resident memory of ``qvit-export`` with parity on the photographs, for models whose
attention probabilities are large (tokens² × heads × blocks per image), at several ``--parity-memory`` budgets.

    .venv/bin/python benchmarks/parity_memory.py [--models vit_small_patch14_reg4_dinov2 vit_base_patch16_384]
                                                 [--budgets 1024 2048] [--out benchmarks/results]

Each model is random-init (no model hub here; memory does not depend on the weights' values), W8A8 PTQ calibrated on
the 17 photographs and saved as a checkpoint by one child process; then the real command, ``qvit-export --ckpt ...
--onnx ... --parity-data photos --parity-memory B``, runs in another child, and its peak resident set size is read
from the kernel (``wait4``'s rusage) when it exits. Writes parity_memory.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("vit_small_patch14_reg4_dinov2", "vit_base_patch16_384")

PREPARE = """
import sys, torch
from qvit_export import QuantConfig, calibrate, create_model, quantize, save_checkpoint
from qvit_export.data import photo_batch
torch.manual_seed(0)
fp = create_model(sys.argv[1]).eval()
qm = calibrate(quantize(fp, QuantConfig(w_bits=8, a_bits=8, irm=False)), [photo_batch(fp)], progress=False)
save_checkpoint(sys.argv[2], qm, extra={"dataset": "photos"})
print(fp.patch_embed.num_patches + fp.num_prefix_tokens)
"""


def run(argv: list[str], env: dict) -> tuple[int, float, float, str]:
    """(exit code, peak resident MiB, seconds, last output line) of a child process."""
    start = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.stdout.close()
    code = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in out.replace("\r", "\n").splitlines() if ln.strip()]
    return code, usage.ru_maxrss / 1024, time.perf_counter() - start, (lines[-1] if lines else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--budgets", nargs="+", type=int, default=[1024, 2048])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    python = sys.executable
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            ckpt = Path(tmp) / f"{name}.pt"
            code, _, seconds, tokens = run([python, "-c", PREPARE, name, str(ckpt)], env)
            if code:
                raise SystemExit(f"{name}: preparing the checkpoint failed: {tokens}")
            for budget in args.budgets:
                onnx = Path(tmp) / f"{name}_{budget}.onnx"
                code, peak, seconds, last = run([str(Path(python).parent / "qvit-export"), "--ckpt", str(ckpt),
                                                 "--onnx", str(onnx), "--parity-data", "photos",
                                                 "--parity-memory", str(budget),
                                                 # random weights leave a ViT's 1,000 logits near ties, so top-1
                                                 # agreement means little here (random-init ViT-B/384: 88% on the
                                                 # 17 photographs while every code check passed); codes still count
                                                 "--min-top1-agreement", "0"], env)
                last = last.replace(tmp + os.sep, "")
                report = json.loads(onnx.with_suffix(".parity.json").read_text()) if code == 0 else {}
                row = {"model": name, "date": date.today().isoformat(), "tokens": int(tokens), "budget_mb": budget,
                       "exit": code,
                       "peak_rss_mb": round(peak), "seconds": round(seconds, 1),
                       "images": report.get("images"), "top1_agreement": report.get("top1_agreement"),
                       "chunk": report.get("images_per_chunk"), "last_line": last if code else None}
                rows.append(row)
                print(json.dumps(row), flush=True)
    import torch

    out = Path(args.out)
    previous = out / "parity_memory.json"  # rows of models not measured in this run are kept
    if previous.is_file():
        rows = [r for r in json.loads(previous.read_text())["rows"] if r["model"] not in args.models] + rows
    results = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "torch": torch.__version__, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "parity_memory.md").write_text(markdown(results))
    print((out / "parity_memory.md").read_text())
    return 0


def markdown(results: dict) -> str:
    lines = [f"# Parity memory ({results['date']})", "",
             f"Machine: {results['machine']}; torch {results['torch']}. `qvit-export --ckpt CKPT --onnx OUT "
             "--parity-data photos --parity-memory B` on W8A8 PTQ checkpoints (random init, calibrated on the 17 "
             "photographs; top-1 agreement not required: random weights give near-tied logits, the codes are still "
             "checked); peak resident memory of the command, from the kernel; each row dated.", "",
             "| model | date | tokens | --parity-memory MB | images per chunk | peak RSS MB | seconds | exit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {r.get('date', results['date'])} | {r['tokens']} | {r['budget_mb']} | {r['chunk'] if r['chunk'] else ''} | "
                     f"{r['peak_rss_mb']} | {r['seconds']} | {r['exit']}{' ' + r['last_line'] if r['exit'] else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
