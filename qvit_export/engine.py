"""TensorRT engines from the QDQ ONNX: the only module that imports tensorrt or tensorrt_rtx_bindings.

One builder serves three libraries, told apart by what they have, never by version numbers alone:
- NVIDIA TensorRT 10.x, weakly typed: INT8 and FP16 builder flags let it choose precisions around the QDQ pairs;
- TensorRT 11.x and TensorRT-RTX: strongly typed, every op runs in its ONNX dtype (export with --dtype fp16
  for speed); TensorRT-RTX also builds ahead of time, with no GPU, for a named compute capability.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .atomic import evidence_path, write_text
from .errors import QvitError

TARGETS = ("auto", "tensorrt", "tensorrt-rtx")
INSTALL_HINT = ("install TensorRT (pip install 'qvit-export[trt]' from NVIDIA's index, or 'qvit-export[trt-rtx]' "
                "to build ahead of time) or use the Docker image")


def import_tensorrt(target: str = "auto"):
    """(module, library name) for the requested target; a clear error when it is missing."""
    if target not in TARGETS:
        raise QvitError(f"target {target!r} is unknown: choose one of {', '.join(TARGETS)}")
    candidates = {"tensorrt": ["tensorrt"], "tensorrt-rtx": ["tensorrt_rtx_bindings"],
                  "auto": ["tensorrt", "tensorrt_rtx_bindings"]}[target]
    for module in candidates:
        try:
            return __import__(module), ("tensorrt-rtx" if module == "tensorrt_rtx_bindings" else "tensorrt")
        except ImportError:
            continue
    raise QvitError(f"no TensorRT library for target '{target}': {INSTALL_HINT}")


def _logger(trt):
    class Collect(trt.ILogger):
        """Keeps errors, and the builder's ``Layers:`` listing of the engine's kernels (a VERBOSE message)."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.listings: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
            elif msg.startswith("Layers:"):
                self.listings.append(msg)

    return Collect()


def _parse(trt, builder, logger, onnx_path: Path, strongly_typed: bool):
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        err = parser.get_error(0)
        node = err.node_name() if hasattr(err, "node_name") else err.node()
        op = err.node_operator() if hasattr(err, "node_operator") else "?"
        raise QvitError(f"TensorRT cannot parse ONNX node '{node}' ({op}): {err.desc()}")
    return network, parser


def _compute_capability(trt, name: str):
    key = name.upper()
    if not hasattr(trt, "ComputeCapability") or key not in trt.ComputeCapability.__members__:
        known = [k.lower() for k in getattr(trt, "ComputeCapability", {}).__members__ if k.startswith("SM")] \
            if hasattr(trt, "ComputeCapability") else []
        raise QvitError(f"compute capability {name!r} is not a target of this TensorRT: choose one of {', '.join(known)}")
    return trt.ComputeCapability.__members__[key]


def layer_summary(trt, network) -> dict:
    types: dict[str, int] = {}
    qdq = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = str(layer.type).split(".")[-1]
        types[kind] = types.get(kind, 0) + 1
        if kind in ("QUANTIZE", "DEQUANTIZE"):
            qdq.append({"name": layer.name, "type": kind})
    return {"layers": network.num_layers, "layer_types": dict(sorted(types.items())), "qdq_layers": qdq}


def _inspect(trt, logger, plan: bytes) -> dict:
    """Per-layer engine information; needs a GPU to deserialize the plan."""
    if not hasattr(trt, "Runtime") or not hasattr(trt, "LayerInformationFormat"):
        return {"skipped": "this TensorRT library has no engine inspector"}
    try:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            return {"skipped": "the plan cannot be deserialized here (no GPU, or another GPU than its target)"}
        inspector = engine.create_engine_inspector()
        return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception as e:  # noqa: BLE001 - any failure here only means no inspector data
        return {"skipped": f"engine inspector unavailable: {type(e).__name__}"}


def engine_anatomy(onnx_model, listing: str | None, inspector: dict) -> dict:
    """The anatomy of a built engine (anatomy.py) from the builder's listing, else the inspector's JSON."""
    from . import anatomy
    from .onnx_graph import quantized_ops

    reasons = anatomy.export_reasons({p.key: p.value for p in onnx_model.metadata_props})
    if listing:
        kernels, source = anatomy.parse_layer_listing(listing), "builder layer listing (ProfilingVerbosity.DETAILED)"
    elif "Layers" in inspector:
        kernels, source = anatomy.parse_inspector_json(inspector), "engine inspector (JSON)"
    else:
        return {"skipped": "no layer information: the builder printed no listing and "
                           + inspector.get("skipped", "the engine inspector returned none")}
    result = anatomy.analyze(kernels, quantized_ops(onnx_model), reasons)
    result["source"] = source
    return result


def listing_cost(listing: str | None) -> dict:
    """The plan's cost (plan_cost.py) from the builder's kernel listing, or why there is none: a dynamic batch leaves
    -1 dimensions, whose bytes no one can sum (qvit-export --cost-batch builds at a fixed batch for that)."""
    from . import anatomy, plan_cost

    if not listing:
        return {"skipped": "the builder printed no kernel listing"}
    kernels = anatomy.parse_layer_listing(listing)
    if plan_cost.has_unknown_dims(kernels):
        return {"skipped": "dynamic batch: the listing's -1 dimensions hide the bytes each kernel moves; build at a "
                           "fixed batch (--static-batch, or --cost-batch N beside the dynamic plan)"}
    return plan_cost.plan_cost(kernels).to_dict()


def check_build_options(target: str = "auto", compute_capability: str | None = None,
                        batch: tuple[int, int, int] = (1, 8, 32)):
    """Everything about a build that can be refused before any work: (module, library name)."""
    trt, library = import_tensorrt(target)
    lo, opt, hi = batch
    if not 1 <= lo <= opt <= hi:
        raise QvitError(f"--batch {lo},{opt},{hi} must be min,opt,max with 1 <= min <= opt <= max")
    if compute_capability:
        if library != "tensorrt-rtx":
            raise QvitError("--compute-capability is for TensorRT-RTX ahead-of-time builds: TensorRT builds for the "
                            "GPU it runs on, so leave it out or use --target tensorrt-rtx")
        _compute_capability(trt, compute_capability)
    return trt, library


def _progress_monitor(trt, progress: bool):
    """A progress bar over the builder's top-level phases, and the way a SIGINT/SIGTERM cancels a build
    (interrupts.py: a signal raised inside a TensorRT callback would be swallowed)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None
    from tqdm.auto import tqdm

    from . import interrupts

    class Monitor(trt.IProgressMonitor):
        """One bar, reset at each top-level phase (nested phases only tick it)."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bar = tqdm(total=0, desc="TensorRT", unit="step", leave=False, disable=not progress)
            self.phase = None

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                self.phase = phase_name
                self.bar.reset(total=num_steps)
                self.bar.set_description(f"TensorRT: {phase_name}", refresh=False)

        def step_complete(self, phase_name, step):
            if phase_name == self.phase:
                self.bar.update(1)
            return not interrupts.pending()  # False cancels the build

        def phase_finish(self, phase_name):
            pass

        def close(self):
            self.bar.close()

    return Monitor()


def build_plan(onnx_path, target: str = "auto", compute_capability: str | None = None,
               batch: tuple[int, int, int] = (1, 8, 32), workspace_mib: int | None = None, timing_cache=None,
               plan_name=None, onnx_name=None, progress: bool = True,
               fixed_batch: int | None = None) -> tuple[bytes, dict, bytes | None]:
    """Build a TensorRT plan from a QDQ ONNX file, writing nothing: (plan, build report, timing cache bytes
    to store or None). ``plan_name``/``onnx_name`` are the paths the report records (the files may be staged
    under other names). ``fixed_batch``: build a dynamic-batch graph at that one batch instead of a profile (the
    network's inputs take it), so that every tensor of the kernel listing has known dimensions and the report
    carries the plan's cost (plan_cost.py). SIGINT/SIGTERM cancel the build and are raised when it stops."""
    from . import interrupts

    trt, library = check_build_options(target, compute_capability, batch)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise QvitError(f"ONNX model not found: {onnx_path}")
    lo, opt, hi = batch
    logger = _logger(trt)
    builder = trt.Builder(logger)
    weakly_typed = hasattr(trt.BuilderFlag, "INT8")  # TensorRT 10.x; gone in 11.x and TensorRT-RTX
    network, parser = _parse(trt, builder, logger, onnx_path, strongly_typed=not weakly_typed)
    config = builder.create_builder_config()
    if hasattr(trt, "ProfilingVerbosity"):  # the kernel listing that the anatomy reads
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if weakly_typed:
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
    if compute_capability:
        config.num_compute_capabilities = 1
        config.set_compute_capability(_compute_capability(trt, compute_capability), 0)
    if workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    # TensorRT-RTX keeps no timing cache (its cache calls are no-ops): only TensorRT reads and writes one.
    cache_path = Path(timing_cache) if timing_cache and library == "tensorrt" else None
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t for t in inputs if tuple(t.shape)[0] == -1]
    if fixed_batch is not None:
        if fixed_batch < 1:
            raise QvitError(f"a fixed batch of {fixed_batch} images: give 1 or more")
        for tensor in dynamic:
            tensor.shape = (int(fixed_batch), *tuple(tensor.shape)[1:])
        dynamic = []
    if dynamic:  # a --static-batch graph needs no profile
        profile = builder.create_optimization_profile()
        for tensor in dynamic:
            dims = tuple(tensor.shape)[1:]
            profile.set_shape(tensor.name, (lo, *dims), (opt, *dims), (hi, *dims))
        config.add_optimization_profile(profile)
    else:
        lo = opt = hi = tuple(inputs[0].shape)[0]
    monitor = _progress_monitor(trt, progress)
    if monitor is not None:
        config.progress_monitor = monitor

    start = time.perf_counter()
    with interrupts.deferred():  # a signal cancels through the monitor, then is raised here
        try:
            plan = builder.build_serialized_network(network, config)
        finally:
            if monitor is not None:
                monitor.close()
    seconds = time.perf_counter() - start
    if plan is None:
        detail = logger.errors[-1] if logger.errors else "no reason given"
        raise QvitError(f"TensorRT could not build the engine: {detail.splitlines()[0]}")
    plan = bytes(plan)

    import onnx

    from .onnx_export import file_sha256

    onnx_model = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in onnx_model.metadata_props}
    report = {
        "library": library, "version": trt.__version__, "typing": "weak (INT8+FP16 flags)" if weakly_typed else "strong",
        "target": compute_capability or "this machine's GPU", "onnx": str(onnx_name or onnx_path),
        "onnx_sha256": file_sha256(onnx_path),  # which ONNX this plan was built from, should the ONNX be replaced
        "precision": meta.get("precision"), "dtype": meta.get("dtype"), "batch": {"min": lo, "opt": opt, "max": hi},
        "plan": str(plan_name) if plan_name else None, "plan_bytes": len(plan), "build_seconds": round(seconds, 3),
        **layer_summary(trt, network),
    }
    report["engine_inspector"] = _inspect(trt, logger, plan) if not compute_capability else \
        {"skipped": "built ahead of time for another target: inspect on that GPU"}
    from .anatomy import find_layer_listing

    listing = find_layer_listing(logger.listings)
    report["anatomy"] = engine_anatomy(onnx_model, listing, report["engine_inspector"])
    report["cost"] = listing_cost(listing)
    report["timing_cache"] = str(cache_path) if cache_path else ("not used by TensorRT-RTX" if timing_cache else None)
    cache_bytes = bytes(config.get_timing_cache().serialize()) if cache_path is not None else None
    return plan, report, cache_bytes


def check_float_gemms(report: dict, report_path, allow_float_gemms: bool) -> None:
    """Refuse an engine that runs a quantized layer as a float GEMM; the evidence goes to ``*.failed.json``."""
    from .anatomy import float_gemm_layers

    floats = float_gemm_layers(report["anatomy"]) if "summary" in report["anatomy"] else []
    if floats and not allow_float_gemms:
        evidence = evidence_path(report_path)
        write_text(evidence, json.dumps(report, indent=2, sort_keys=True, allow_nan=False))
        layers = list(dict.fromkeys(e["layer"] for e in floats))  # a qkv layer's three slices: named once
        names = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
        raise QvitError(f"TensorRT runs quantized layer(s) {names} as float GEMMs ({floats[0]['kernel']}: inputs "
                        f"{'/'.join(floats[0]['input_dtypes']) or 'none'}): the QDQ pattern did not fuse; no plan "
                        f"written, anatomy in {evidence} (pass --allow-float-gemms to keep such an engine)")


def default_report_path(plan_path) -> Path:
    """``x.plan`` -> ``x.build.json``."""
    return Path(plan_path).with_suffix(".build.json")


@dataclass(frozen=True)
class EngineOptions:
    """How to build a plan. ``target``: auto (TensorRT, else TensorRT-RTX), tensorrt or tensorrt-rtx;
    ``compute_capability`` (TensorRT-RTX only, e.g. "sm89"): build ahead of time for that GPU, here, without one;
    ``batch``: the dynamic batch profile (min, opt, max); ``workspace_mib``: the builder's memory pool (None: its
    default); ``timing_cache``: a file TensorRT reads and updates (TensorRT-RTX keeps none); ``allow_float_gemms``:
    keep a plan in which a quantized layer became a float GEMM (otherwise the build fails, with its anatomy as
    evidence); ``cost_batch``: read the plan's cost (plan_cost.py) at this batch: from the plan itself when its batch
    is fixed, else from one more build at that batch; and, where the caller gives the float model's graph
    (deploy does), the FP16 float model's plan at the same batch, to which the cost is compared."""

    target: str = "auto"
    compute_capability: str | None = None
    batch: tuple[int, int, int] = (1, 8, 32)
    workspace_mib: int | None = None
    timing_cache: str | Path | None = None
    allow_float_gemms: bool = False
    cost_batch: int | None = None

    def __post_init__(self):
        if self.cost_batch is not None and (isinstance(self.cost_batch, bool) or not isinstance(self.cost_batch, int)
                                            or not 1 <= self.cost_batch <= 4096):
            raise QvitError(f"--cost-batch {self.cost_batch!r} must be a whole number of images from 1 to 4096")
        if self.target not in TARGETS:
            raise QvitError(f"target {self.target!r} is unknown: choose one of {', '.join(TARGETS)}")
        try:
            batch = tuple(int(b) for b in self.batch)
        except (TypeError, ValueError):
            batch = ()
        if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
            raise QvitError(f"--batch {self.batch!r} must be min,opt,max with 1 <= min <= opt <= max")
        object.__setattr__(self, "batch", batch)

    def check(self):
        """Everything about the build that can be refused before any work: (TensorRT module, library name)."""
        return check_build_options(self.target, self.compute_capability, self.batch)

    def timing_cache_path(self, library: str) -> Path | None:
        """The timing cache the build reads and updates: TensorRT's only."""
        return Path(self.timing_cache) if self.timing_cache and library == "tensorrt" else None


def build_engine(onnx_path, plan_path, options: EngineOptions | None = None, report_path=None, progress: bool = True,
                 **settings) -> dict:
    """Build a TensorRT plan from a QDQ ONNX file; the plan and its build report JSON (and an updated timing
    cache) replace what was there together, or not at all (transaction.py). ``options``, or its fields as keyword
    arguments (``target="tensorrt-rtx", compute_capability="sm89"``).

    The report's ``anatomy`` (anatomy.py) says which kernel computes each quantized layer and in which
    datatypes; a quantized layer left as a float GEMM fails the build (nothing written but the evidence,
    ``<report>.failed.json``) unless ``allow_float_gemms``."""
    from .transaction import OutputSet

    if options is not None and settings:
        raise QvitError("give build_engine an EngineOptions or its fields as keywords, not both")
    options = options or EngineOptions(**settings)
    _, library = options.check()
    plan_path = Path(plan_path)
    report_path = Path(report_path) if report_path else default_report_path(plan_path)
    outputs = {"plan": plan_path, "build report": report_path, "timing cache": options.timing_cache_path(library)}
    with OutputSet(outputs, inputs={"onnx": Path(onnx_path)}, removes=[evidence_path(report_path)]) as out:
        return write_engine(out, onnx_path, ("plan", "build report", "timing cache"), options, onnx_name=onnx_path,
                            progress=progress)


def write_engine(out, onnx_path, labels: tuple[str, str, str], options: EngineOptions, onnx_name=None,
                 progress: bool = True, baseline_onnx=None) -> dict:
    """Build into an open OutputSet ``out`` whose outputs ``labels`` (plan, build report, and the timing cache
    when TensorRT uses one) are staged, check the anatomy, write the staged files, and commit. TensorRT reads
    the timing cache where it is; its update is staged like the plan. ``baseline_onnx``: the float model's FP16
    graph (onnx_export.float_baseline), whose plan the cost is compared with when ``options.cost_batch`` is set."""
    plan_label, report_label, cache_label = labels
    report_path = out.outputs[report_label]
    plan, report, cache_bytes = build_plan(onnx_path, options.target, options.compute_capability, options.batch,
                                           options.workspace_mib, options.timing_cache,
                                           plan_name=out.outputs[plan_label], onnx_name=onnx_name, progress=progress)
    check_float_gemms(report, report_path, options.allow_float_gemms)
    if options.cost_batch is not None:
        report["cost"] = cost_at_batch(onnx_path, options, report, baseline_onnx, progress)
    report["report"] = str(report_path)
    out.write(report_label, json.dumps(report, indent=2, sort_keys=True, allow_nan=False).encode())
    out.write(plan_label, plan)
    if cache_label in out.outputs:
        out.write(cache_label, cache_bytes)
    out.commit()
    return report


def cost_at_batch(onnx_path, options: EngineOptions, report: dict, baseline_onnx=None, progress: bool = True) -> dict:
    """The cost of ``onnx_path``'s plan at ``options.cost_batch`` images (the built plan's own when its batch is that
    one, else a second build at that fixed batch), with ``fp16``: the float baseline's cost at the same batch and
    ``vs_fp16``: the ratios to it (MB moved, activation MB, estimated ms per GPU profile)."""
    from .plan_cost import compare

    batch = options.cost_batch
    if report["batch"] == {"min": batch, "opt": batch, "max": batch} and "skipped" not in report["cost"]:
        cost = dict(report["cost"])
    else:
        cost = build_plan(onnx_path, options.target, options.compute_capability, workspace_mib=options.workspace_mib,
                          progress=progress, fixed_batch=batch)[1]["cost"]
    cost["batch"] = batch
    if baseline_onnx is not None and "skipped" not in cost:
        fp16 = build_plan(baseline_onnx, options.target, options.compute_capability,
                          workspace_mib=options.workspace_mib, progress=progress, fixed_batch=batch)[1]["cost"]
        cost |= {"fp16": fp16, "vs_fp16": compare(cost, fp16)}
    return cost


class EngineModule:
    """A TensorRT plan behind a callable face (CUDA GPU only), so it is evaluated like a checkpoint."""

    def __init__(self, plan_path, target: str = "auto"):
        import torch

        if not torch.cuda.is_available():
            raise QvitError("cannot run a TensorRT engine here: no CUDA GPU; evaluate the ONNX with --onnx instead")
        plan_path = Path(plan_path)
        if not plan_path.is_file():
            raise QvitError(f"TensorRT plan not found: {plan_path}")
        trt, _ = import_tensorrt(target)
        self.logger = _logger(trt)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise QvitError(f"{plan_path} does not load here (built for another GPU or TensorRT version): rebuild it")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        self.trt = trt
        self.training = False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def parameters(self):
        import torch

        yield torch.zeros(0)  # evaluate() reads the device from here: inputs stay on the CPU until __call__

    def __call__(self, x):
        import torch

        max_batch = self.engine.get_tensor_profile_shape(self.input, 0)[2][0] if self.engine.num_optimization_profiles \
            else self.engine.get_tensor_shape(self.input)[0]
        if len(x) > max_batch:  # the engine's profile bounds the batch: run in pieces
            return torch.cat([self(part) for part in x.split(max_batch)])
        in_dtype = self.dtypes[self.engine.get_tensor_dtype(self.input)]
        x = x.to("cuda", in_dtype).contiguous()
        if not self.context.set_input_shape(self.input, tuple(x.shape)):
            raise QvitError(f"the engine does not accept input shape {tuple(x.shape)}: rebuild it with a wider --batch")
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), device="cuda",
                          dtype=self.dtypes[self.engine.get_tensor_dtype(self.output)])
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise QvitError("TensorRT failed to run the engine: " + (self.logger.errors[-1] if self.logger.errors else "?"))
        stream.synchronize()
        return out.float().cpu()
