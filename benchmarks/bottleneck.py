"""The paper's bottleneck analysis on our probes: what quantizing ONE group of the blocks' quantizers costs, by
itself, at W2A2 and W3A3, after PTQ and after QAT (what the paper reports).

    .venv/bin/python benchmarks/bottleneck.py --demo-teacher runs/demo_fp/best.pt   # PTQ now, QAT rows as they finish
    .venv/bin/python benchmarks/bottleneck.py --report     # the tables from what exists, no new PTQ
    (the QAT runs are trained by benchmarks/ablation_deep.py's workers, which share its queue)

Groups (qvit_export.config.QUANT_GROUPS): the MLP (fc1/fc2 weights and inputs), the MHSA weights (qkv/proj), the
MHSA activations as the paper and the issue list them (q, k, v and the attention probabilities), the inputs of
qkv and proj (the LayerNorm output and the attention output: activations of the MHSA block that are not the
attention's own, kept apart so that "MHSA activations" means what the two attention matmuls see), and everything.
The patch embedding and the head stay at 8 bits in every row, as in every run.

PTQ and QAT: see METHOD.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ledger import LEDGER, digest  # noqa: E402
from qat_queue import Probe, run_row, student_job  # noqa: E402

from qvit_export.atomic import write_text  # noqa: E402

# (label, groups or None for all of them)
GROUP_ROWS = (("MLP alone (fc1/fc2 weights and inputs)", ("mlp",)),
              ("MHSA weights alone (qkv/proj)", ("mhsa_weights",)),
              ("MHSA activations alone (q, k, v, attention)", ("mhsa_acts",)),
              ("MHSA linear inputs alone (qkv/proj inputs)", ("mhsa_inputs",)),
              ("everything", None))
BITS = (2, 3)
METHOD = ("PTQ: the FP teacher quantized with only that group on (no IRM), MSE calibration on the shipped calibration "
          "set (calib/fashion-mnist.json, 1,024 class-balanced training images), top-1 on the 10,000 test images. "
          "After QAT: an LSQ student (no IRM, no DGD; the probe's student recipe, seed 0) trained with only that group "
          "quantized; its calibrated start (epoch 0) is PTQ on the run's own draw of 1,024 training images; the "
          "'everything' row is the ablation's LSQ student (the same run). The figure is top-1 after the last epoch.")


def group_slug(groups) -> str:
    return "all" if groups is None else "+".join(groups)


def qat_name(groups, bits: int, seed: int = 0) -> str:
    """The run's folder; the everything row is the ablation's LSQ student."""
    return f"lsq_w{bits}a{bits}_s{seed}" if groups is None else f"lsq_only_{group_slug(groups)}_w{bits}a{bits}_s{seed}"


def qat_overrides(groups, bits: int, seed: int = 0) -> dict:
    base = {"w_bits": bits, "a_bits": bits, "irm": False, "dgd": False, "seed": seed}
    return base if groups is None else base | {"quant_groups": list(groups)}


# Which QAT rows each probe trains, and in which tier of the shared queue (qat_queue; tier x 10 there): the deep
# probe fully (its question), the 2-block probe at W2A2 only (3-epoch runs; they need only its teacher, which trains
# beside the deep one, so they fill the second worker while the deep teacher trains), the MHSA linear inputs last.
QAT_PLAN = {"deep": {2: 1, 3: 1}, "probe": {2: 0}}


def qat_jobs(probes: dict[str, Probe], progress: bool = False) -> list:
    jobs = []
    for probe_name, plan in QAT_PLAN.items():
        probe = probes.get(probe_name)
        if probe is None:
            continue
        for bits, tier in plan.items():
            for _, groups in GROUP_ROWS:
                late = groups == ("mhsa_inputs",)
                jobs.append(student_job(probe, qat_name(groups, bits), tier * 10 + (20 if late else 0),
                                        lambda g=groups, b=bits: qat_overrides(g, b), progress=progress))
    return jobs


# ---- PTQ --------------------------------------------------------------------------------------------------

def ptq_table(teacher: Path, cache: Path, compute: bool = True) -> dict | None:
    """{bits: {group slug: top-1}} and the teacher's own top-1, cached in ``cache`` for this teacher."""
    from qvit_export.checkpoint import load_checkpoint, read_checkpoint

    if not teacher.is_file():
        return None
    key = {"teacher": digest(teacher), "teacher_top1": read_checkpoint(teacher)["metrics"]["top1"]}
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved
    if not compute:
        return None
    from qvit_export import QuantConfig, calibrate, quantize
    from qvit_export.data import fashion_mnist
    from qvit_export.evaluation import evaluate

    fp = load_checkpoint(teacher)
    test = fashion_mnist("test")
    table = {"key": key, "fp": evaluate(fp, test, progress=False)["top1"], "ptq": {}}
    for bits in BITS:
        for label, groups in GROUP_ROWS:
            cfg = QuantConfig(w_bits=bits, a_bits=bits, irm=False, **({"groups": groups} if groups else {}))
            model = calibrate(quantize(fp, cfg), "fashion-mnist", progress=False)
            top1 = evaluate(model, test, progress=False)["top1"]
            table["ptq"].setdefault(str(bits), {})[group_slug(groups)] = top1
            print(f"PTQ W{bits}A{bits} {label}: {top1:.2f}% (FP {table['fp']:.2f}%)", flush=True)
    write_text(cache, json.dumps(table, indent=2))
    return table


# ---- report -----------------------------------------------------------------------------------------------

def probe_section(title: str, ptq: dict | None, probe: Probe | None, qat_bits) -> tuple[str, dict]:
    fp = ptq["fp"] if ptq else (probe.fp()["top1"] if probe is not None and probe.teacher_done() else None)
    data = {"title": title, "fp": fp, "rows": []}
    if fp is None:
        return f"### {title}\n\nThe teacher is not trained yet.\n", data

    def cell(top1):
        return "–" if top1 is None else f"{top1:.2f} ({top1 - fp:+.2f})"

    head = "| group quantized (others FP) |" + "".join(
        f" W{b}A{b} PTQ |" + (f" W{b}A{b} QAT start | W{b}A{b} after QAT |" if b in qat_bits else "") for b in BITS)
    lines = [head, "|---|" + "---|" * (head.count("|") - 2)]
    for label, groups in GROUP_ROWS:
        row = {"group": group_slug(groups), "label": label}
        cells = []
        for bits in BITS:
            p = (ptq or {}).get("ptq", {}).get(str(bits), {}).get(group_slug(groups))
            row[f"w{bits}_ptq"] = p
            cells.append(cell(p))
            if bits in qat_bits:
                r = run_row(probe, qat_name(groups, bits), qat_overrides(groups, bits)) if probe else None
                row[f"w{bits}_qat_start"] = r["start"] if r else None
                row[f"w{bits}_qat"] = r["final"] if r else None
                cells += [cell(row[f"w{bits}_qat_start"]), cell(row[f"w{bits}_qat"])]
        data["rows"].append(row)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    verdicts = []
    singles = [r for r in data["rows"] if r["group"] != "all"]
    for bits in BITS:
        for stage, key in (("PTQ", f"w{bits}_ptq"), ("after QAT", f"w{bits}_qat")):
            values = {r["label"]: r.get(key) for r in singles}
            if values and all(v is not None for v in values.values()):
                worst = min(values, key=values.get)
                verdicts.append(f"W{bits}A{bits} {stage}: the costliest group alone is {worst} "
                                f"({values[worst] - fp:+.2f} against FP)")
                data.setdefault("costliest", {})[f"w{bits}_{'ptq' if stage == 'PTQ' else 'qat'}"] = worst
    text = (f"### {title}\n\nFP teacher: {fp:.2f}%. Cells: top-1 % on the 10,000 test images (difference from "
            "the FP teacher).\n\n" + "\n".join(lines) + "\n\n" + ("\n".join(f"- {v}" for v in verdicts) + "\n"
                                                                  if verdicts else ""))
    return text, data


def write_report(args, probes: dict[str, Probe], compute_ptq: bool) -> str:
    sections, data = [], {}
    plan = [("demo", "Demo teacher (models/demo_fp.yaml: depth 2, width 128, 4 heads of 32; PTQ only)",
             Path(args.demo_teacher) if args.demo_teacher else None, None, ()),
            ("probe", "The 2-block probe (models/probe_fp.yaml / probe_qat.yaml: depth 2, 3 epochs of QAT)",
             probes["probe"].teacher, probes["probe"], tuple(QAT_PLAN["probe"])),
            ("deep", "The deep probe (models/probe_deep_fp.yaml / probe_deep_qat.yaml: depth 6, 2 heads of 64, "
                     "1 epoch of QAT)", probes["deep"].teacher, probes["deep"], tuple(QAT_PLAN["deep"]))]
    for key, title, teacher, probe, qat_bits in plan:
        if teacher is None:
            continue
        cache_name = f"ptq_bottleneck_{key}.json"
        cache = probe.keep(cache_name) if probe else Path(args.workdir_root) / cache_name
        finished = probe is None or probe.teacher_done()  # a teacher still training has a best.pt already
        ptq = ptq_table(teacher, cache, compute_ptq and finished) if finished else None
        text, section = probe_section(title, ptq, probe, qat_bits)
        sections.append(text)
        data[key] = section
    when = datetime.date.today().isoformat()
    header = (f"The bottleneck analysis ({when}, {platform.machine()}, {os.cpu_count()} cores): one group of the blocks' "
              "quantizers on, the rest FP (patch embedding and head at 8 bits), no IRM, no DGD. "
              + METHOD + "\n\n")
    text = header + "\n".join(sections)
    out = Path(args.results) / "bottleneck"
    write_text(out.with_suffix(".md"), text)
    write_text(out.with_suffix(".json"), json.dumps({"date": when, "probes": data}, indent=2))
    return text


def probes_from(args) -> dict[str, Probe]:
    def ledger(name: str) -> Path | None:
        return None if args.ledger == "none" else Path(args.ledger) / name

    return {"deep": Probe("deep", "probe_deep_fp", "probe_deep_qat", Path(args.workdir_root) / "deep", ledger("deep")),
            "probe": Probe("probe", "probe_fp", "probe_qat", Path(args.workdir_root) / "probe", ledger("probe"))}


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir-root", default="runs",
                   help="where the probes' runs live: <root>/deep (deep probe), <root>/probe (2-block probe)")
    p.add_argument("--ledger", default=str(LEDGER),
                   help="where finished teachers, students and measurements are kept across machines "
                        "(benchmarks/ledger.py; commit it); 'none' keeps only the run folders")
    p.add_argument("--demo-teacher", help="the demo teacher's best.pt (models/demo_fp.yaml), for its PTQ rows")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="folder of the results tables")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--report", action="store_true", help="tables from what exists; no new PTQ")
    args = p.parse_args(argv)
    print(write_report(args, probes_from(args), compute_ptq=not args.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
