"""OPs and size of the paper's models at 2, 3 and 4 bits (qvit_export.report; conventions in its docstring).

    .venv/bin/python benchmarks/ops_report.py        # -> benchmarks/results/ops_report.{md,json}
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qvit_export import QuantConfig, create_model  # noqa: E402
from qvit_export.atomic import write_text  # noqa: E402
from qvit_export.report import report  # noqa: E402

MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
          "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224")


def main() -> int:
    lines = ["| model | FP GFLOPs | FP MB | W/A | OPs G (×) | BOPs/64 G (×) | size MB (×) |", "|---|---|---|---|---|---|---|"]
    rows = []
    for name in MODELS:
        model = create_model(name)
        for bits in (4, 3, 2):
            s = report(model, QuantConfig(w_bits=bits, a_bits=bits), name).summary()
            rows.append(s)
            lines.append(f"| {name} | {s['fp_gflops']:.2f} | {s['fp_mb']:.1f} | {bits}/{bits} | {s['ops_g']:.3f} "
                         f"({s['ops_reduction']:.2f}×) | {s['bops64_g']:.3f} ({s['bops_reduction']:.2f}×) | "
                         f"{s['q_mb']:.1f} ({s['size_reduction']:.2f}×) |")
    text = "\n".join(lines) + "\n"
    out = ROOT / "benchmarks" / "results" / "ops_report"
    write_text(out.with_suffix(".md"), text)
    write_text(out.with_suffix(".json"), json.dumps(rows, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
