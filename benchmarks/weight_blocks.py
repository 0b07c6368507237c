"""Weight steps per block against per channel: PTQ of the demo ViT at low weight bits with one LSQ step per output
channel (the default) and with one per block of 64 inputs of each channel (QuantConfig.w_block=64, TensorRT's
INT4 block), top-1 on the 10,000 Fashion-MNIST test images.

    .venv/bin/python benchmarks/weight_blocks.py          # -> benchmarks/results/weight_blocks.{md,json}

The teacher: the demo's (``make demo``), or the test suite's, trained from models/demo_fp.yaml if neither exists.
Each student: MSE calibration on the shipped calibration set (calib/fashion-mnist.json, 1,024 class-balanced
training images), no IRM; weights at 4, 3 and 2 bits under 8-bit activations (the weights' effect alone) and with
activations at the same width. The demo ViT (width 128, MLP 512) has two blocks of 64 in every qkv, proj and fc1
and eight in fc2; the patch embedding and head stay 8-bit, per channel.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from qvit_export.atomic import write_text  # noqa: E402

WIDTHS = ((4, 8), (3, 8), (2, 8), (4, 4), (3, 3), (2, 2))
BLOCK = 64


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)

    from tqdm import tqdm

    from qvit_export import QuantConfig, calibrate, quantize, read_manifest
    from qvit_export.data import fashion_mnist
    from qvit_export.evaluation import evaluate
    from runtimes import demo_teacher

    teacher = demo_teacher()
    calib, test = read_manifest("fashion-mnist"), fashion_mnist("test")
    fp = evaluate(teacher, test, progress=False)["top1"]
    rows = []
    for w, a in tqdm(WIDTHS, desc="widths", unit="width"):
        top1 = {}
        for block in (None, BLOCK):
            model = calibrate(quantize(teacher, QuantConfig(w, a, irm=False, w_block=block)), calib, progress=False)
            top1["block" if block else "channel"] = evaluate(model, test, progress=False)["top1"]
        rows.append({"w_bits": w, "a_bits": a, "per_channel": top1["channel"], "per_block": top1["block"],
                     "gain": top1["block"] - top1["channel"]})
    when = datetime.date.today().isoformat()
    lines = [f"Weight steps per block ({BLOCK}) against per channel, {when}, {platform.machine()}: PTQ of the demo ViT "
             f"(FP teacher {fp:.2f}%), MSE calibration on calib/fashion-mnist.json, no IRM; top-1 % on the 10,000 "
             "test images. Command: `.venv/bin/python benchmarks/weight_blocks.py`.", "",
             "| W/A | per channel | per block of 64 | gain |", "|---|---|---|---|"]
    lines += [f"| W{r['w_bits']}A{r['a_bits']} | {r['per_channel']:.2f} | {r['per_block']:.2f} | {r['gain']:+.2f} |"
              for r in rows]
    text = "\n".join(lines) + "\n"
    out = Path(args.results) / "weight_blocks"
    write_text(out.with_suffix(".md"), text)
    write_text(out.with_suffix(".json"), json.dumps({"date": when, "fp_top1": fp, "block": BLOCK, "rows": rows},
                                                    indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
