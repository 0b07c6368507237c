"""Parity of the exported graph with the PyTorch model, through ONNX Runtime, in LSBs and top-1 agreement.

- Logits: the graph as shipped against the PyTorch model, both run end to end, in ONNX Runtime with its basic
  graph optimizations. Its extended ones fuse QDQ into integer kernels (QLinearMatMul, MatMulIntegerToFloat)
  whose x86 arithmetic is ORT's own, not the graph's: measured on the demo ViT at W8A8 (3,000 test images),
  basic 100.00% top-1 agreement and max |Δlogit| 0.035, extended 99.63% and 0.32. TensorRT never sees those
  kernels; qvit-eval --onnx still runs ORT fully optimized, as a user of ORT would.
- Integer codes, per quantizer: a second session whose QuantizeLinear outputs are graph outputs too (extra
  outputs change which kernels ORT fuses, so they never touch the logits session). PyTorch then runs each
  layer on ORT's quantized inputs (every quantizer hands on ORT's codes), so a code that flips is counted in
  the layer where it flips, not again in every layer downstream of it.
- Weights: the stored INT8/INT4 initializers against the PyTorch codes, exactly (a qkv stored as q, k and v
  slices is put back together first: onnx_graph.weight_initializers).
- A weight-only graph (``int4-weight-only``) has no activation quantizers: it is compared with the PyTorch model
  whose activation quantizers are switched off, on logits and stored weights.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .atomic import write_text
from .config import ATTENTION_MODES
from .errors import QvitError
from .lsq import ACTIVATION
from .quantize import quantizers, quantizers_disabled

MIN_TOP1_AGREEMENT = 99.9   # percent of images whose top-1 class matches
MIN_CODE_MATCH = 99.9       # percent of integer codes identical, per quantizer
MAX_LSB = 1                 # largest code difference allowed, per quantizer


@dataclass(frozen=True)
class ParityThresholds:
    """What parity requires of an export. ``for_dtype`` gives the defaults of a graph's dtype: FP16 rounding moves
    values across code boundaries, which changes predictions near ties (measured on the demo ViT at W4A4: 95-98%
    top-1 agreement with the FP32 PyTorch model, accuracy within 0.4 points), so an FP16 graph is held to 90% top-1
    agreement and 98% equal codes; an FP32 graph to 99.9% and 99.9%. Either at most 1 LSB apart."""

    min_top1: float = MIN_TOP1_AGREEMENT
    min_codes: float = MIN_CODE_MATCH
    max_lsb: int = MAX_LSB

    @classmethod
    def for_dtype(cls, dtype: str, min_top1: float | None = None, min_codes: float | None = None,
                  max_lsb: int | None = None) -> "ParityThresholds":
        """The dtype's defaults, each replaced by the value given (None keeps the default)."""
        given = {"min_top1": min_top1, "min_codes": min_codes, "max_lsb": max_lsb}
        base = cls(90.0, 98.0) if dtype == "fp16" else cls()
        return replace(base, **{k: v for k, v in given.items() if v is not None})


@dataclass
class QuantizerParity:
    codes: int = 0
    equal: int = 0
    max_lsb: int = 0
    nonfinite: int = 0  # PyTorch values (before rounding) that were NaN or inf: no code at all

    @property
    def match_percent(self) -> float:
        return 100.0 * self.equal / max(self.codes, 1)


@dataclass
class ParityReport:
    images: int = 0
    top1_agree: int = 0
    max_abs_logit_diff: float = 0.0
    sum_abs_logit_diff: float = 0.0
    logits: int = 0
    quantizers: dict[str, QuantizerParity] = field(default_factory=dict)
    weights_identical: bool = True
    weight_mismatches: list[str] = field(default_factory=list)
    nonfinite_logits: int = 0  # NaN or inf on either side; such an image never counts as agreeing
    images_per_chunk: int = 0  # how many images were compared at once (images_per_chunk)

    @property
    def top1_agreement(self) -> float:
        return 100.0 * self.top1_agree / max(self.images, 1)

    @property
    def mean_abs_logit_diff(self) -> float:
        return self.sum_abs_logit_diff / max(self.logits, 1)

    def failures(self, min_top1=MIN_TOP1_AGREEMENT, min_codes=MIN_CODE_MATCH, max_lsb=MAX_LSB) -> list[str]:
        out = []
        if self.nonfinite_logits:
            out.append(f"{self.nonfinite_logits} logits are NaN or infinite")
        if self.top1_agreement < min_top1:
            out.append(f"top-1 agreement {self.top1_agreement:.3f}% < {min_top1}%")
        for name, q in self.quantizers.items():
            if q.nonfinite:
                out.append(f"{name}: {q.nonfinite} values NaN or infinite")
            elif q.match_percent < min_codes or q.max_lsb > max_lsb:
                out.append(f"{name}: {q.match_percent:.3f}% codes equal, max {q.max_lsb} LSB")
        if not self.weights_identical:
            out.append(f"stored weight codes differ from PyTorch in {', '.join(self.weight_mismatches[:3])}")
        return out

    def to_json(self) -> str:
        d = asdict(self) | {"ort_graph_optimization": PARITY_ORT_OPTIMIZATION}
        d["quantizers"] = {k: asdict(v) | {"match_percent": v.match_percent} for k, v in self.quantizers.items()}
        d |= {"top1_agreement": self.top1_agreement, "mean_abs_logit_diff": self.mean_abs_logit_diff}
        return json.dumps(d, indent=2, sort_keys=True, allow_nan=False)  # strict JSON: non-finite is counted

    def table(self, rows: int = 8) -> str:
        """A summary line, then the ``rows`` quantizers that agree least (all of them are in the JSON)."""
        worst = sorted(self.quantizers.items(), key=lambda kv: (kv[1].match_percent, -kv[1].max_lsb))
        lines = [f"parity on {self.images} images: top-1 agreement {self.top1_agreement:.3f}%, "
                 f"|Δlogit| max {self.max_abs_logit_diff:.4g} mean {self.mean_abs_logit_diff:.3g}, "
                 f"stored weights {'identical' if self.weights_identical else 'DIFFERENT'}",
                 f"{len(worst)} activation quantizers: codes equal >= {worst[0][1].match_percent:.4f}%, "
                 f"max {max(q.max_lsb for _, q in worst)} LSB; least agreeing:" if worst else "no quantizers",
                 f"  {'quantizer':<46} {'codes':>12} {'equal %':>9} {'max LSB':>8}"]
        for name, q in worst[:rows]:
            lines.append(f"  {name:<46} {q.codes:>12} {q.match_percent:>9.4f} {q.max_lsb:>8}")
        return "\n".join(lines)


PARITY_ORT_OPTIMIZATION = "ORT_ENABLE_BASIC"


# ONNX Runtime turns a weight-only graph's blocked INT4 DequantizeLinear → MatMul into MatMulNBits, whose
# accuracy_level says how it computes: 4 (ORT's default) quantizes the activations to int8 per block at run time, 1
# dequantizes the weights and multiplies in fp32, the values a weight-only graph means (parity compares against
# PyTorch with its activation quantizers off). On the AVX512/AMX machine of benchmarks/runtimes.py level 1 was
# also the faster (deit_small W4, batch 32: MatMulNBits 953 ms at level 1, 1,095 ms at level 4), so sessions that
# evaluate an export use it.
ORT_MATMULNBITS_ACCURACY_LEVEL = 1


def ort_session(model_or_path, threads: int | None = None, optimization: str = "ORT_ENABLE_ALL"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(ORT_MATMULNBITS_ACCURACY_LEVEL))
    if threads:
        opts.intra_op_num_threads = threads
    src = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    try:
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for bad files
        where = "the ONNX model" if hasattr(model_or_path, "SerializeToString") else model_or_path
        raise QvitError(f"ONNX Runtime cannot load {where}: {str(e).splitlines()[0][:200]}") from None


def _tapped_model(onnx_model, outputs: dict[str, str]):
    """A copy whose QuantizeLinear outputs are graph outputs too."""
    import onnx

    tapped = onnx.ModelProto()
    tapped.CopyFrom(onnx_model)
    for tensor in outputs.values():
        tapped.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.INT8, None))
    return tapped


def _forced_codes(model: nn.Module, report: "ParityReport", forced: dict[str, np.ndarray]):
    """Hooks that compare each activation quantizer's own codes with ORT's (``forced``) as the forward pass reaches
    it, then hand on ORT's codes instead; nothing of a quantizer is kept once it has been counted."""

    def hook(m, inp, out, name):
        theirs = torch.from_numpy(forced.pop(name)).reshape(out.shape)
        mine = torch.round(out.float() / m.scale().float())  # what the forward pass computed (NaN stays NaN)
        d = (theirs.to(torch.float32) - mine).abs_()
        ok = torch.isfinite(d)
        p = report.quantizers[name]
        p.codes += d.numel()
        p.nonfinite += int((~ok).sum())
        p.equal += int((d[ok] == 0).sum())
        p.max_lsb = max(p.max_lsb, int(d[ok].max()) if bool(ok.any()) else 0)
        return theirs.to(out.dtype) * m.scale().to(out.dtype)

    return [q.register_forward_hook(lambda m, inp, out, name=name: hook(m, inp, out, name))
            for name, q in quantizers(model) if name in report.quantizers]


# What one image costs parity, per code that ORT hands back: the code itself (int8, all of them held until PyTorch
# has run the image) and, for the largest quantized tensor, what is live at once while it is computed and compared
# (ORT's float input of it, PyTorch's float output, own and ORT codes as int32, their difference, the float
# codes handed on). Measured with benchmarks/parity_memory.py (peak resident memory against the budget).
HELD_BYTES_PER_CODE = 1
PEAK_BYTES_PER_CODE = 24
DEFAULT_MEMORY_MB = 2048


def images_per_chunk(code_sizes: list[int], memory_mb: int, batch_size: int) -> int:
    """How many images parity runs at once: as many as ``memory_mb`` holds, given the number of codes each tapped
    quantizer returns per image (attention probabilities grow with tokens² × heads, for every block), at least
    one and at most ``batch_size``."""
    if memory_mb <= 0:
        raise QvitError(f"parity memory budget {memory_mb} MB must be positive: pass a budget in MB, e.g. 2048")
    per_image = HELD_BYTES_PER_CODE * sum(code_sizes) + PEAK_BYTES_PER_CODE * max(code_sizes, default=0)
    return max(1, min(batch_size, (memory_mb << 20) // max(per_image, 1)))


def compare(model: nn.Module, onnx_path, images, batch_size: int = 250, progress: bool = True,
            memory_mb: int = DEFAULT_MEMORY_MB) -> ParityReport:
    """Compare a quantized PyTorch model with its exported ONNX graph on ``images`` (a tensor [N, C, H, W]), at most
    ``batch_size`` images at a time and fewer where the codes of one image are large: ``memory_mb`` bounds what the
    integer-code comparison holds (images_per_chunk), so a 518-pixel DINOv2 (1,374 tokens) is compared in chunks of
    a few images instead of all at once.

    ``model`` is compared in the form the graph says it deployed (its ``attention`` metadata; a graph without it
    predates the choice and is exact): onnx_export.deployment_form."""
    import onnx

    from .onnx_export import ExportOptions, deployment_form

    graph = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in graph.metadata_props}
    weight_only = meta.get("precision") == "int4-weight-only"
    attention = meta.get("attention", "exact")
    if attention not in ATTENTION_MODES:
        raise QvitError(f"{onnx_path} says attention={attention!r}, which is none of {', '.join(ATTENTION_MODES)}: "
                        "export it again")
    model = deployment_form(model, ExportOptions(attention=attention))
    with quantizers_disabled(model, weights=False) if weight_only else contextlib.nullcontext():
        return _compare(model, graph, onnx_path, images, batch_size, progress, weight_only, memory_mb)


def _compare(model, graph, onnx_path, images, batch_size, progress, weight_only, memory_mb) -> ParityReport:
    from .onnx_export import graph_layouts
    from .onnx_graph import quantize_outputs, weight_initializers

    taps = quantize_outputs(graph)
    layouts = graph_layouts(model)
    report = ParityReport()
    named = dict(quantizers(model))
    for name, stored in weight_initializers(graph).items():
        q = named.get(name)
        layer = model.get_submodule(name.rsplit(".", 1)[0])
        expected = q.int_codes(layer.weight).numpy() if q is not None else None
        if stored.ndim == 2 and expected is not None and stored.size == expected.size:
            stored = stored.T.reshape(expected.shape)  # MatMul weights are stored [in, out] (a patch Conv's flattened)
        if expected is None or stored.shape != expected.shape or not np.array_equal(stored, expected):
            report.weights_identical = False
            report.weight_mismatches.append(name)
    missing = set() if weight_only else set(n for n, q in named.items() if q.role == ACTIVATION) - set(taps)
    if missing:
        raise QvitError(f"the ONNX graph has no QuantizeLinear for {sorted(missing)[:3]}: export it again")

    plain = ort_session(onnx_path, optimization=PARITY_ORT_OPTIMIZATION)
    tapped = ort_session(_tapped_model(graph, taps), optimization=PARITY_ORT_OPTIMIZATION) if taps else None
    input_name = plain.get_inputs()[0].name
    input_type = np.float16 if "float16" in plain.get_inputs()[0].type else np.float32
    tap_names = list(taps)
    report.quantizers = {name: QuantizerParity() for name in tap_names}
    model.eval()
    if tapped is not None and len(images):  # one image tells how many codes each quantizer returns per image
        probe = tapped.run([taps[n] for n in tap_names], {input_name: images[:1].numpy().astype(input_type)})
        batch_size = images_per_chunk([c.size for c in probe], memory_mb, batch_size)
        del probe
    report.images_per_chunk = min(batch_size, len(images))
    bar = tqdm(total=len(images), desc="parity", unit="img", leave=False, disable=not progress)
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        feed = {input_name: x.numpy().astype(input_type)}
        with torch.no_grad():
            ref = model(x).float().numpy()
        got = plain.run(None, feed)[0].astype(np.float32)
        # np.maximum and max() skip NaN silently, so non-finite logits are counted apart and fail the check; the
        # differences are taken in float64, where two finite float32 logits cannot overflow.
        finite = np.isfinite(got) & np.isfinite(ref)
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))[finite]
        report.images += len(x)
        report.nonfinite_logits += int((~finite).sum())
        report.top1_agree += int(((got.argmax(1) == ref.argmax(1)) & finite.all(1)).sum())
        report.max_abs_logit_diff = max(report.max_abs_logit_diff, float(diff.max()) if diff.size else 0.0)
        report.sum_abs_logit_diff += float(diff.sum())
        report.logits += diff.size
        del ref, got, diff, finite
        if taps:
            codes = tapped.run([taps[n] for n in tap_names], feed)
            forced = {n: layouts[n](c) if n in layouts else c for n, c in zip(tap_names, codes, strict=True)}
            del codes
            hooks = _forced_codes(model, report, forced)
            try:
                with torch.no_grad():
                    model(x)
            finally:
                for h in hooks:
                    h.remove()
        bar.update(len(x))
    bar.close()
    return report


def write_report(report: ParityReport, path) -> Path:
    return write_text(path, report.to_json())


class OnnxModule(nn.Module):
    """An ONNX model behind an nn.Module face (ONNX Runtime on the CPU), so it is evaluated like a checkpoint."""

    def __init__(self, path):
        super().__init__()
        if not Path(path).is_file():
            raise QvitError(f"ONNX model not found: {path}")
        self.session = ort_session(path)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_type = np.float16 if "float16" in inp.type else np.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.session.run(None, {self.input_name: x.cpu().numpy().astype(self.input_type)})[0]
        except Exception as e:  # noqa: BLE001 - wrong shapes surface as ORT's own exception types
            raise QvitError(f"ONNX Runtime rejected images of shape {tuple(x.shape)}: {str(e).splitlines()[0][:160]}; "
                            "is --data the model's dataset?") from None
        return torch.from_numpy(out.astype(np.float32))


def default_report_path(onnx_path) -> Path:
    """``x.onnx`` -> ``x.parity.json``."""
    return Path(onnx_path).with_suffix(".parity.json")


def stage_export(out, model: nn.Module, images: torch.Tensor | None, options=None, metadata: dict | None = None,
                 simplify: bool = True, labels: tuple[str, str] = ("onnx", "parity report"),
                 min_top1: float | None = None, min_codes: float | None = None, max_lsb: int | None = None,
                 progress: bool = True, memory_mb: int = DEFAULT_MEMORY_MB) -> ParityReport | None:
    """Export into the staged ONNX of an open OutputSet ``out`` and, given ``images``, prove parity and stage
    the JSON report; commits nothing. Failing parity writes the report to ``*.parity.failed.json`` and raises.
    Thresholds left None are the defaults of the export's dtype (ParityThresholds.for_dtype)."""
    from .atomic import evidence_path
    from .onnx_export import ExportOptions, onnx_model

    onnx_label, report_label = labels
    options = options or ExportOptions()
    limits = ParityThresholds.for_dtype(options.dtype, min_top1, min_codes, max_lsb)
    graph = onnx_model(model, options, metadata, simplify=simplify)
    out.write(onnx_label, graph.SerializeToString())
    if images is None:
        return None
    report = compare(model, out.stage(onnx_label), images, progress=progress, memory_mb=memory_mb)
    report_path = out.outputs[report_label]
    failures = report.failures(limits.min_top1, limits.min_codes, limits.max_lsb)
    if failures:
        evidence = write_report(report, evidence_path(report_path))
        raise QvitError(f"parity below thresholds ({failures[0]}; {len(failures)} in all, evidence in {evidence}): "
                        "the ONNX and its report were not written; look for a damaged checkpoint or calibration, or "
                        "loosen --min-top1-agreement/--min-code-match/--max-lsb if the figures are acceptable")
    out.write(report_label, report.to_json().encode())
    return report
