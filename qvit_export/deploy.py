"""deploy(model, DeployOptions(...), DeployOutputs(...)): a calibrated or trained quantized model to a QDQ ONNX, its
parity with PyTorch proved through ONNX Runtime, and a TensorRT plan whose anatomy is checked, as one output set:
every file is written, or none is (transaction.py).

qvit-export, qvit-quantize and the demo call this; the commands only parse their flags into the options.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .engine import EngineOptions
from .errors import QvitError
from .onnx_export import ExportOptions
from .parity import DEFAULT_MEMORY_MB, ParityReport, ParityThresholds


@dataclass(frozen=True)
class ParityOptions:
    """The parity check's thresholds (None: the defaults of the export's dtype, ParityThresholds.for_dtype) and the
    memory it may hold for the codes it compares (parity.images_per_chunk)."""

    min_top1: float | None = None
    min_codes: float | None = None
    max_lsb: int | None = None
    memory_mb: int = DEFAULT_MEMORY_MB

    def thresholds(self, dtype: str) -> ParityThresholds:
        return ParityThresholds.for_dtype(dtype, self.min_top1, self.min_codes, self.max_lsb)


@dataclass(frozen=True)
class DeployOptions:
    """What to deploy: the graph (``export``), the parity check (None: skipped) and the plan (None: no engine)."""

    export: ExportOptions = field(default_factory=ExportOptions)
    parity: ParityOptions | None = field(default_factory=ParityOptions)
    engine: EngineOptions | None = None
    simplify: bool = True  # onnxsim, guarded so that no QDQ node is lost


@dataclass(frozen=True)
class DeployOutputs:
    """Where the files go. The parity report defaults to ``<onnx>.parity.json``, the build report to
    ``<engine>.build.json``."""

    onnx: Path
    parity_report: Path | None = None
    engine: Path | None = None
    build_report: Path | None = None


@dataclass(frozen=True)
class Labels:
    """How messages name each output (the commands use their flags: "--onnx", "--engine", ...)."""

    onnx: str = "onnx"
    parity_report: str = "parity report"
    engine: str = "engine"
    build_report: str = "build report"
    timing_cache: str = "timing cache"


@dataclass
class Deployed:
    """What deploy wrote: the ONNX's size, the parity report (None when skipped), the build report (None without
    an engine) and, for an int4 precision, {layer: why its weights stayed INT8}."""

    onnx_bytes: int
    parity: ParityReport | None
    build: dict | None
    int8_weight_layers: dict[str, str] = field(default_factory=dict)


def planned_outputs(options: DeployOptions, outputs: DeployOutputs, labels: Labels = Labels()) -> tuple[dict, list]:
    """({label: path or None}, [files to remove at commit]) of one deployment: the outputs an OutputSet stages, and
    the evidence of an earlier failure (and a parity report of an ONNX no longer there) that it removes."""
    from .atomic import evidence_path
    from .engine import default_report_path as default_build_report
    from .parity import default_report_path as default_parity_report

    if (options.engine is None) != (outputs.engine is None):
        raise QvitError("an engine needs both EngineOptions and an output path: give both, or neither")
    parity = Path(outputs.parity_report or default_parity_report(outputs.onnx))
    planned = {labels.onnx: Path(outputs.onnx), labels.parity_report: parity if options.parity else None}
    removes = [evidence_path(parity)] + ([] if options.parity else [parity])
    if options.engine is not None:
        report = Path(outputs.build_report or default_build_report(outputs.engine))
        planned |= {labels.engine: Path(outputs.engine), labels.build_report: report}
        removes.append(evidence_path(report))
    return planned, removes


def check_tools(options: DeployOptions, planned: dict, labels: Labels = Labels()) -> None:
    """Refuse before any work what cannot be done here (an opset too low, no TensorRT, an unknown GPU); add the
    timing cache that TensorRT reads and updates to ``planned``."""
    options.export.resolved_opset()
    if options.engine is not None:
        _, library = options.engine.check()
        cache = options.engine.timing_cache_path(library)
        if cache is not None:
            planned[labels.timing_cache] = cache


def deploy(model: nn.Module, options: DeployOptions, outputs: DeployOutputs, images: torch.Tensor | None = None,
           metadata: dict | None = None, log: Callable[[str], None] | None = None, progress: bool = True) -> Deployed:
    """Export ``model``, prove parity on ``images`` (required unless ``options.parity`` is None), build the plan
    when ``options.engine`` says, and write every output or none. ``log`` receives one line per step."""
    from .transaction import OutputSet

    planned, removes = planned_outputs(options, outputs)
    check_tools(options, planned)
    with OutputSet(planned, removes=removes) as out:
        return deploy_staged(out, model, options, images, metadata, log=log, progress=progress)


def deploy_staged(out, model: nn.Module, options: DeployOptions, images: torch.Tensor | None = None,
                  metadata: dict | None = None, labels: Labels = Labels(), onnx_name=None,
                  log: Callable[[str], None] | None = None, progress: bool = True) -> Deployed:
    """deploy's steps inside an open OutputSet ``out`` (which may hold the caller's own outputs too, such as
    qvit-quantize's checkpoint): ONNX, parity, engine; commits the set."""
    import time

    from .parity import stage_export

    say = log or (lambda line: None)
    export = options.export
    if options.parity is not None and images is None:
        raise QvitError("the parity check needs images: give images, or ParityOptions None to skip it")
    parity = options.parity or ParityOptions()
    limits = parity.thresholds(export.dtype)
    start = time.perf_counter()
    say(f"exporting {onnx_name or out.outputs[labels.onnx]} ({export.precision}, {export.dtype}, opset "
        f"{export.resolved_opset()}, {export.exporter} exporter)")
    report = stage_export(out, model, images if options.parity is not None else None, export, metadata,
                          options.simplify, labels=(labels.onnx, labels.parity_report), min_top1=limits.min_top1,
                          min_codes=limits.min_codes, max_lsb=limits.max_lsb, progress=progress,
                          memory_mb=parity.memory_mb)
    onnx_bytes = out.stage(labels.onnx).stat().st_size
    kept = {}
    if report is not None:
        say(report.table())
        if export.dtype == "fp16":
            say("note: fp16 graph against the fp32 PyTorch model; measure its accuracy with qvit-eval --onnx")
    say(f"ONNX ready: {onnx_bytes / 1e6:.2f} MB, {time.perf_counter() - start:.1f} s")
    if export.int4:
        from .onnx_export import int4_layers

        chosen, kept = int4_layers(model, export.int4_block)
        say(f"INT4 weights (block {export.int4_block}): {len(chosen)} layers; INT8 weights: {len(kept)} layers"
            + "".join(f"\n  {name}: {why}" for name, why in kept.items()))
    if options.engine is None:
        out.commit()
        return Deployed(onnx_bytes, report, None, kept)
    from .engine import write_engine

    say(f"building {out.outputs[labels.engine]}")
    with tempfile.TemporaryDirectory(prefix="qvit-baseline-") as tmp:
        baseline = None
        if options.engine.cost_batch is not None:  # the float model's FP16 plan, which the cost is compared with
            from .onnx_export import float_baseline
            from .onnx_graph import save_atomic

            say(f"exporting the FP16 float model for the plan cost at batch {options.engine.cost_batch}")
            baseline = save_atomic(float_baseline(model), Path(tmp) / "fp16.onnx")
        built = write_engine(out, out.stage(labels.onnx), (labels.engine, labels.build_report, labels.timing_cache),
                             options.engine, onnx_name=onnx_name or out.outputs[labels.onnx], progress=progress,
                             baseline_onnx=baseline)
    return Deployed(onnx_bytes, report, built, kept)
