"""Command-line entry points: qvit-train, qvit-quantize, qvit-export, qvit-eval, qvit-report and qvit-calib (thin:
parse, call the library, report). Nothing heavy is imported before the arguments are parsed, so --help is quick
and works without torch."""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import signal
import sys
from pathlib import Path

from .config import SUPPORTED_BITS
from .errors import QvitError


def _run(main, argv) -> int:
    """Run a command: one line and exit 2 for bad input, 130/143 for SIGINT/SIGTERM (interrupts.py)."""
    from . import interrupts

    from .transaction import COMMITTED

    interrupts.install()
    COMMITTED.clear()
    try:
        return main(argv)
    except QvitError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except (MemoryError, RecursionError, RuntimeError, OSError) as e:
        what = _resource_error(e)
        if what is None:
            raise
        print(f"error: {what}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, interrupts.Terminated) as e:
        what = "interrupted (SIGINT)" if isinstance(e, KeyboardInterrupt) else "terminated (SIGTERM)"
        done = (f"after writing {', '.join(map(str, COMMITTED))}" if COMMITTED
                else "files being written were discarded, earlier ones left as they were")
        print(f"{what}: stopped; {done}", file=sys.stderr)
        return interrupts.EXIT_CODES[signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM]


# How the libraries report running out of memory: Python and numpy raise MemoryError; torch's CPU allocator a
# RuntimeError ("DefaultCPUAllocator: can't allocate memory"); ONNX Runtime and C++ code "bad_alloc"; the kernel
# ENOMEM (mmap, fork of a loader worker).
_OUT_OF_MEMORY = ("can't allocate memory", "cannot allocate memory", "out of memory", "bad_alloc", "bad allocation")


def _resource_error(e: BaseException) -> str | None:
    """The one line for an error that is the machine's limits, not a bug (None for any other error): what to
    reduce."""
    text = str(e).lower()
    if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM) \
            or (isinstance(e, RuntimeError) and any(marker in text for marker in _OUT_OF_MEMORY)):
        return ("out of memory: reduce what one step holds (--parity-images, --batch-size, --calib-images, the "
                "model's image size) or the input's size, or run where there is more memory")
    if isinstance(e, RecursionError):
        return "an input is nested too deeply to be read (maximum recursion depth): the file is damaged or hostile"
    return None


def _one_line(message: str) -> str:
    """A QvitError raised in a DataLoader worker comes back wrapped in the worker's traceback: its last line."""
    if "\n" not in message:
        return message
    last = [ln for ln in message.splitlines() if ln.strip()][-1]
    return last.split("QvitError: ", 1)[-1]


def _batch_triple(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give min,opt,max such as 1,8,32") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: give three numbers min,opt,max such as 1,8,32")
    if not 1 <= values[0] <= values[1] <= values[2]:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= min <= opt <= max")
    return values


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: a whole number in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {lo} to {hi}" if hi is not None
                                             else f"{value} is out of range: give {lo} or more")
        return value
    return parse


def _float_in(lo: float, hi: float):
    """An argparse type: a finite number in [lo, hi]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a finite number from {lo:g} to {hi:g}")
        return value
    return parse


def _compute_capability(text: str) -> str:
    if not re.fullmatch(r"sm\d{2,3}", text.lower()):
        raise argparse.ArgumentTypeError(f"{text!r}: give a compute capability such as sm89 (the TensorRT-RTX "
                                         "library decides which it can target)")
    return text.lower()


def _add_image_limit(group) -> None:
    """--max-image-mb: the largest image file a command reads from a folder (untrusted.MAX_IMAGE_BYTES)."""
    group.add_argument("--max-image-mb", type=_int_in(1, 4096), default=64,
                       help="the largest image file read from a folder, in MiB (default 64); a larger one is refused")


def _image_bytes(args) -> int:
    return args.max_image_mb << 20


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error of every other failure (argparse prints usage first)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


# ---- qvit-export ------------------------------------------------------------------------------------

def _add_export_options(p: argparse.ArgumentParser) -> None:
    """The graph, parity and engine options of qvit-export (qvit-quantize takes the same ones)."""
    g = p.add_argument_group("graph")
    g.add_argument("--precision", choices=("int8", "int4", "int4-weight-only"), default="int8",
                   help="int8: INT8 weights and activations (the fastest engine); int4: MatMul weights of <= 4 bits "
                        "as INT4 blocks, activations INT8 (TensorRT-RTX converts the weights to INT8 on every "
                        "inference); int4-weight-only: INT4 weight blocks, activations in --dtype (TensorRT's INT4 path, "
                        "the smallest engine)")
    from .config import INT4_BLOCKS

    g.add_argument("--int4-block", type=int, choices=INT4_BLOCKS, default=64,
                   help="INT4 block size along K (default 64: covers the most of DeiT/Swin; layers whose K is no "
                        "multiple stay INT8)")
    g.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="dtype of the non-quantized ops")
    from .config import ATTENTION_MODES

    g.add_argument("--attention", choices=ATTENTION_MODES, default=ATTENTION_MODES[0],
                   help="attention probabilities below 8 bits: fused (the default: deployed as 8-bit codes on the same "
                        "step, which TensorRT runs as one fused attention kernel) or exact (the trained b-bit clamp "
                        "kept; TensorRT then runs each attention as several kernels); at 8 bits both are one graph")
    g.add_argument("--opset", type=_int_in(17, 21), help="ONNX opset 17 to 21 (default: 17, 19 for fp16, 21 for int4)")
    g.add_argument("--static-batch", action="store_true", help="fix the batch size to 1 instead of a dynamic axis")
    g.add_argument("--decompose-layernorm", action="store_true",
                   help="write LayerNorm as elementary ops (TensorRT 8.5 / JetPack 5)")
    g.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    from .onnx_routes import DEFAULT_ROUTE, ROUTES

    g.add_argument("--exporter", choices=tuple(ROUTES), default=DEFAULT_ROUTE,
                   help="PyTorch's ONNX exporter: dynamo (torch.export, the default) or torchscript (PyTorch's "
                        "deprecated exporter, kept while PyTorch ships it); the same graph either way (tested)")
    v = p.add_argument_group("parity")
    v.add_argument("--parity-data", default="auto",
                   help="auto (the checkpoint's dataset, else photographs), fashion-mnist, photos, or an image folder")
    v.add_argument("--parity-images", type=_int_in(1), default=1000, help="how many images (default 1000)")
    v.add_argument("--parity-report", help="JSON report path (default: <onnx>.parity.json)")
    v.add_argument("--parity-memory", type=_int_in(64), default=2048, metavar="MB",
                   help="memory for comparing integer codes (default 2048): fewer images at a time where one image "
                        "has many codes (long token sequences)")
    v.add_argument("--min-top1-agreement", type=_float_in(0, 100), help="percent (default 99.9; 90 with --dtype fp16)")
    v.add_argument("--min-code-match", type=_float_in(0, 100),
                   help="percent per quantizer (default 99.9; 98 with --dtype fp16)")
    v.add_argument("--max-lsb", type=_int_in(0, 255), help="largest code difference allowed (default 1)")
    v.add_argument("--no-parity", action="store_true", help="skip the parity check")
    e = p.add_argument_group("engine")
    e.add_argument("--target", choices=("auto", "tensorrt", "tensorrt-rtx"), default="auto")
    e.add_argument("--compute-capability", type=_compute_capability, help="TensorRT-RTX ahead-of-time target, e.g. sm89")
    e.add_argument("--batch", type=_batch_triple, help="min,opt,max batch of the dynamic axis (default 1,8,32)")
    e.add_argument("--workspace", type=_int_in(1), help="builder workspace limit in MiB")
    e.add_argument("--timing-cache", help="timing cache file, read and updated")
    e.add_argument("--allow-float-gemms", action="store_true",
                   help="keep an engine in which a quantized layer runs as a float GEMM (default: refuse it)")
    e.add_argument("--cost-batch", type=_int_in(1, 4096), metavar="N",
                   help="read the plan's cost at a batch of N (MB moved, GEMM work, estimated ms on GPU profiles: "
                        "docs/usage.md), beside the FP16 float model's plan at N; one or two more builds")


def export_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qvit-export", description="Export a quantized checkpoint to QDQ ONNX, prove "
                                "parity with PyTorch through ONNX Runtime, and build a TensorRT engine.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by qvit-train, qvit-quantize or save_checkpoint")
    p.add_argument("--onnx", help="ONNX output (default: next to --engine, else next to the checkpoint)")
    p.add_argument("--engine", help="TensorRT plan to build (needs TensorRT or TensorRT-RTX)")
    _add_export_options(p)
    _add_image_limit(p)
    return p


def _default_onnx(args) -> Path:
    if args.onnx:
        return Path(args.onnx)
    if args.engine:
        return Path(args.engine).with_suffix(".onnx")
    ckpt = Path(args.ckpt)
    return ckpt.with_name(f"{ckpt.stem}.{args.precision}.onnx")


def _given_export_options(args) -> list[str]:
    """The graph and parity options (of ``_add_export_options``) given a value other than their default."""
    p = argparse.ArgumentParser(add_help=False)
    _add_export_options(p)
    defaults = vars(p.parse_args([]))
    return ["--" + dest.replace("_", "-") for dest, value in defaults.items() if getattr(args, dest) != value]


def _cli_labels():
    """deploy's outputs named by the flags that set them, so that messages say which flag to change."""
    from .deploy import Labels

    return Labels(onnx="--onnx", parity_report="--parity-report", engine="--engine", timing_cache="--timing-cache")


def _deploy_options(args):
    """The export, parity and engine flags as DeployOptions (the library checks each value)."""
    from .deploy import DeployOptions, ParityOptions
    from .engine import EngineOptions
    from .onnx_export import ExportOptions

    export = ExportOptions(precision=args.precision, dtype=args.dtype, opset=args.opset, int4_block=args.int4_block,
                           dynamic_batch=not args.static_batch, decompose_layernorm=args.decompose_layernorm,
                           exporter=args.exporter, attention=args.attention)
    parity = None if args.no_parity else ParityOptions(args.min_top1_agreement, args.min_code_match, args.max_lsb,
                                                       args.parity_memory)
    engine = EngineOptions(target=args.target, compute_capability=args.compute_capability,
                           batch=args.batch or (1, 8, 32), workspace_mib=args.workspace,
                           timing_cache=args.timing_cache, allow_float_gemms=args.allow_float_gemms,
                           cost_batch=args.cost_batch) \
        if args.engine else None
    return DeployOptions(export, parity, engine, simplify=not args.no_simplify)


def _export_plan(args) -> tuple[object, dict, dict, list]:
    """(DeployOptions, outputs, inputs, files to remove at commit) of one export, by flag name; flags that do not
    go together are refused here, and what this machine cannot do (no TensorRT, an opset too low), before any
    work."""
    from .deploy import DeployOutputs, check_tools, planned_outputs

    if not args.engine:
        given = [flag for flag, value in (("--compute-capability", args.compute_capability), ("--batch", args.batch),
                                          ("--workspace", args.workspace), ("--timing-cache", args.timing_cache),
                                          ("--allow-float-gemms", args.allow_float_gemms),
                                          ("--cost-batch", args.cost_batch)) if value]
        if given:
            raise QvitError(f"{given[0]} configures the engine build: add --engine PLAN, or drop {given[0]}")
    if args.static_batch and args.batch:
        raise QvitError("--batch sets the range of a dynamic batch, which --static-batch removes: drop one of them")
    if args.no_parity and (args.parity_report or args.parity_data != "auto"):
        raise QvitError("--no-parity skips the parity check: drop --parity-report/--parity-data, or --no-parity")
    options = _deploy_options(args)
    outputs, removes = planned_outputs(options, DeployOutputs(_default_onnx(args), args.parity_report, args.engine),
                                       _cli_labels())
    check_tools(options, outputs, _cli_labels())
    inputs = {"--parity-data": Path(args.parity_data)
              if args.parity_data not in ("auto", "photos", "fashion-mnist") else None}
    return options, outputs, inputs, removes


def _export_staged(out, args, options, model, metadata: dict, dataset_hint: str | None) -> dict | None:
    """qvit-export's steps inside an open OutputSet (the library's deploy_staged): ONNX, parity, engine; commits
    the set (with whatever else the command staged in it). Returns the build report, or None without --engine."""
    from .deploy import deploy_staged

    images = None
    if options.parity is not None:
        from .data import parity_images

        images, what = parity_images(args.parity_data, model, args.parity_images, dataset_hint, flag="--parity-data",
                                     max_image_bytes=_image_bytes(args))
        print(f"parity data: {what}")
    deployed = deploy_staged(out, model, options, images, metadata, _cli_labels(),
                             log=lambda line: print(line, flush=True))
    return deployed.build


def profiles_for(built: dict) -> tuple[str, ...]:
    """The GPU profiles the cost line names: those built as the plan's target, else the first two."""
    from .plan_cost import GPU_PROFILES

    target = str(built.get("target", "")).lower()
    own = tuple(name for name, p in GPU_PROFILES.items() if p.compute_capability == target)
    return own or tuple(GPU_PROFILES)[:2]


def _print_written(args, outputs: dict, parity: bool, built: dict | None) -> None:
    print(f"wrote {outputs['--onnx']}" + (f" and {outputs['--parity-report']}" if parity else ""))
    if built is not None:
        from .anatomy import summary_line

        print(f"built {args.engine} with {built['library']} {built['version']} for {built['target']}: "
              f"{built['plan_bytes'] / 1e6:.2f} MB, {built['layers']} layers "
              f"({len(built['qdq_layers'])} Q/DQ), {built['build_seconds']:.1f} s; report {built['report']}")
        anatomy = built["anatomy"]
        print(summary_line(anatomy) if "summary" in anatomy else f"anatomy: skipped ({anatomy['skipped']})")
        from .plan_cost import summary_line as cost_line

        cost = built.get("cost") or {}
        print(cost_line(cost, cost.get("fp16"), profiles_for(built)) if "mb" in cost
              else f"cost: skipped ({cost.get('skipped', 'no listing')})")


def _checkpoint_metadata(path: Path, ckpt: dict, name: str | None = None) -> dict:
    """What the ONNX records about the checkpoint it came from (the calibration set comes with the model);
    ``name``: the file's final name when ``path`` is still a staged file."""
    from .onnx_export import file_sha256

    return {"checkpoint_sha256": file_sha256(path), "checkpoint": name or path.name, "model": ckpt["model"],
            "recipe": ckpt["extra"].get("recipe", {"quant": ckpt["quant"]}), "metrics": ckpt.get("metrics", {})}


def export_main(argv=None) -> int:
    args = export_parser().parse_args(argv)
    from .checkpoint import model_from_checkpoint, read_checkpoint
    from .transaction import OutputSet

    options, outputs, inputs, removes = _export_plan(args)
    inputs["--ckpt"] = Path(args.ckpt)
    ckpt_path = Path(args.ckpt)
    with OutputSet(outputs, inputs, removes) as out:
        ckpt = read_checkpoint(ckpt_path)
        if ckpt["quant"] is None:
            raise QvitError(f"{ckpt_path} holds a float model: quantize and calibrate it (qvit-quantize), or train "
                            "it (qvit-train), before export")
        model = model_from_checkpoint(ckpt, ckpt_path)  # one read of the file
        built = _export_staged(out, args, options, model, _checkpoint_metadata(ckpt_path, ckpt),
                               ckpt["extra"].get("dataset"))
    _print_written(args, outputs, not args.no_parity, built)
    return 0


# ---- qvit-quantize ----------------------------------------------------------------------------------

def quantize_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qvit-quantize", description="Post-training quantization in one command: a timm model (or our "
                "FP checkpoint) -> quantize -> calibrate on a calibration set -> a checkpoint qvit-export takes; with "
                "--onnx/--engine it goes straight on to export, with qvit-export's options and guarantees.")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="timm model name, e.g. deit_small_patch16_224 (optional when --weights is an FP "
                   "checkpoint of ours, which names its model)")
    src = m.add_mutually_exclusive_group()
    src.add_argument("--weights", help="a timm weights file (state dict; its head's num_classes and input channels "
                     "are read from it) or an FP checkpoint written by qvit-train")
    src.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (downloaded from its hub)")
    m.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a further timm.create_model argument (repeatable), e.g. --model-arg img_size=28")
    q = p.add_argument_group("quantization")
    q.add_argument("--bits", type=int, choices=SUPPORTED_BITS, help="weight and activation bits")
    q.add_argument("--w-bits", type=int, choices=SUPPORTED_BITS, help="weight bits (default: --bits)")
    q.add_argument("--a-bits", type=int, choices=SUPPORTED_BITS, help="activation bits (default: --bits)")
    from .config import DEFAULT_IRM, IRM_VARIANTS

    q.add_argument("--irm", nargs="?", const=DEFAULT_IRM, default=False, choices=IRM_VARIANTS,
                   help=f"IRM on queries and keys, fitted to the FP model at calibration; a variant may follow "
                        f"({', '.join(IRM_VARIANTS)}; default {DEFAULT_IRM}; token is the paper's)")
    q.add_argument("--method", choices=("mse", "lsq", "percentile"), default="mse", help="step rule (default mse)")
    q.add_argument("--irm-steps", type=_int_in(0), default=100, help="Adam steps of the IRM fit (default 100)")
    from .config import INT4_BLOCKS

    q.add_argument("--w-block", type=int, choices=INT4_BLOCKS,
                   help="one weight step per block of this many inputs instead of per channel, where a layer can be "
                        "INT4 blocks; such a model deploys as INT4 with the same --int4-block")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", required=True,
                   help="a calibration manifest (.json, or a shipped name: fashion-mnist, photos), or an image folder "
                        "to draw one from (written beside --out as <out>.calib.json)")
    c.add_argument("--calib-images", type=_int_in(1), default=1024, help="images drawn from a folder (default 1024)")
    c.add_argument("--seed", type=_int_in(0), default=0, help="seed of the draw and of calibration (default 0)")
    c.add_argument("--calib-root", help="where a folder manifest's images are (default: the root it names)")
    c.add_argument("--batch-size", type=_int_in(1), default=256, help="calibration batch size (default 256)")
    _add_image_limit(c)
    p.add_argument("--out", required=True, help="the calibrated checkpoint to write (what qvit-export --ckpt takes)")
    p.add_argument("--onnx", help="also export the ONNX here (with parity), as qvit-export would")
    p.add_argument("--engine", help="also build a TensorRT plan here (implies the ONNX, next to it by default)")
    _add_export_options(p)
    return p


def _model_args(texts: list[str]) -> dict:
    from .recipe import parse_override

    kwargs = {}
    for text in texts:
        key, value = parse_override(text)
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return kwargs


def quantize_main(argv=None) -> int:
    args = quantize_parser().parse_args(argv)
    w_bits, a_bits = args.w_bits or args.bits, args.a_bits or args.bits
    if w_bits is None or a_bits is None:
        raise QvitError("give the bit widths: --bits 8, or --w-bits and --a-bits")
    if not (args.weights or args.pretrained):
        raise QvitError("PTQ needs trained weights: give --weights FILE (timm weights or our FP checkpoint) or "
                        "--pretrained")
    if args.pretrained and not args.model:
        raise QvitError("--pretrained needs --model: a timm model name")
    export = bool(args.onnx or args.engine)
    if not export:
        given = _given_export_options(args)
        if given:
            raise QvitError(f"{given[0]} is an export option: add --onnx or --engine, or drop {given[0]}")
    from .calibration_set import is_manifest_spec

    out_path = Path(args.out)
    drawn_path = None if is_manifest_spec(args.calib) else out_path.with_name(out_path.stem + ".calib.json")
    outputs = {"--out": out_path, "calibration set": drawn_path}
    inputs = {"--weights": Path(args.weights) if args.weights else None,
              "--calib": Path(args.calib) if Path(args.calib).exists() else None}
    removes, options = [], None
    if export:
        args.ckpt = args.out
        options, more, more_inputs, removes = _export_plan(args)
        if args.w_block and not (options.export.int4 and options.export.int4_block == args.w_block):
            raise QvitError(f"--w-block {args.w_block} weights deploy only as INT4 blocks of {args.w_block}: add "
                            f"--precision int4 (or int4-weight-only) --int4-block {args.w_block}, or drop --w-block")
        outputs |= more
        inputs |= more_inputs
    from .transaction import OutputSet

    with OutputSet(outputs, inputs, removes) as out:
        from .ptq import post_training_quantize

        model, calib_set, hint = post_training_quantize(
            args.model, weights=args.weights, pretrained=args.pretrained, model_kwargs=_model_args(args.model_arg),
            w_bits=w_bits, a_bits=a_bits, irm=args.irm, method=args.method, irm_steps=args.irm_steps, w_block=args.w_block,
            calib=args.calib, calib_images=args.calib_images, seed=args.seed, calib_root=args.calib_root,
            batch_size=args.batch_size, max_image_bytes=_image_bytes(args))
        from .checkpoint import save_checkpoint

        extra = {"dataset": hint, "ptq": {"method": args.method, "irm_steps": args.irm_steps if args.irm else 0,
                                          "seed": args.seed, "weights": Path(args.weights).name if args.weights
                                          else "pretrained"}}
        save_checkpoint(out.stage("--out"), model, extra=extra)
        if drawn_path is not None:
            out.write("calibration set", calib_set.to_json().encode())
        print(f"calibrated {model.qvit_source['name']} W{w_bits}A{a_bits}{f' + IRM ({args.irm})' if args.irm else ''} on "
              f"{calib_set.name} ({len(calib_set.images)} images, sha256 {calib_set.sha256[:12]})", flush=True)
        built = None
        if export:
            ckpt = {"model": model.qvit_source, "quant": model.qvit_config.to_dict(), "extra": extra}  # as saved
            metadata = _checkpoint_metadata(out.stage("--out"), ckpt, out_path.name)
            built = _export_staged(out, args, options, model, metadata, hint)
        else:
            out.commit()
    print(f"wrote {out_path}" + (f" and the calibration set {drawn_path}" if drawn_path else ""))
    if export:
        _print_written(args, outputs, not args.no_parity, built)
    return 0


# ---- qvit-calib -------------------------------------------------------------------------------------

def calib_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qvit-calib", description="Calibration sets as manifests: draw one reproducibly, verify one "
                "against the images on disk, show or list them.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="{draw,verify,show,list}")
    d = sub.add_parser("draw", help="draw a calibration set and write its manifest",
                       description="Draw N images: the smallest sha256('<seed>:<id>') keys, per class with --balanced.")
    d.add_argument("--source", required=True, help="fashion-mnist, photos, or an image folder (class sub-folders, "
                   "or an ImageNet layout whose train/ is used)")
    d.add_argument("--split", choices=("train", "test"), default="train", help="Fashion-MNIST split (default train)")
    d.add_argument("--images", type=_int_in(1), default=1024, help="how many images (default 1024)")
    d.add_argument("--seed", type=_int_in(0), default=0, help="seed of the draw (default 0)")
    d.add_argument("--balanced", action="store_true", help="the same number of images from every class")
    d.add_argument("--name", help="the set's name (default: <source>-<images>-seed<seed>)")
    d.add_argument("--out", required=True, help="manifest file to write (.json)")
    _add_image_limit(d)
    v = sub.add_parser("verify", help="check every image of a manifest against the data on disk")
    v.add_argument("manifest", help="a manifest file or a shipped name")
    v.add_argument("--root", help="the image folder, for a folder manifest (default: the root it names)")
    _add_image_limit(v)
    s = sub.add_parser("show", help="summarise a manifest: source, rule, classes, hash")
    s.add_argument("manifest", help="a manifest file or a shipped name")
    sub.add_parser("list", help="the manifests shipped with qvit-export")
    return p


def calib_main(argv=None) -> int:
    args = calib_parser().parse_args(argv)
    from . import calibration_set as cs

    if args.command == "list":
        for name in cs.shipped_names():
            m = cs.read_manifest(name)
            print(f"{name}: {len(m.images)} images of {m.source['kind']}, sha256 {m.sha256[:12]}  "
                  f"({cs.shipped_dir() / (name + '.json')})")
        return 0
    if args.command == "draw":
        from .atomic import write_text
        from .transaction import check_paths

        if not args.out.endswith(".json"):
            raise QvitError(f"--out {args.out}: a manifest is a .json file; name it so")
        check_paths({"--out": Path(args.out)}, {})
        made = cs.draw(cs.source_from_spec(args.source, args.split, _image_bytes(args)), args.images, args.seed,
                       args.balanced, args.name)
        write_text(args.out, made.to_json())
        print(f"wrote {args.out}: {made.name}, {len(made.images)} images, sha256 {made.sha256}")
        return 0
    made = cs.read_manifest(args.manifest)
    if args.command == "verify":
        made.verify(args.root, progress=True, max_image_bytes=_image_bytes(args))
        print(f"{made.name}: all {len(made.images)} images present and unchanged (sha256 {made.sha256})")
        return 0
    from collections import Counter

    per_class = Counter(e.label for e in made.images if e.label is not None)
    print(f"{made.name}: {len(made.images)} images, source {json.dumps(made.source)}, rule "
          f"{json.dumps(made.rule.to_dict())}, sha256 {made.sha256}")
    if per_class:
        print("per class: " + ", ".join(f"{k}: {v}" for k, v in sorted(per_class.items())))
    return 0


# ---- qvit-train -------------------------------------------------------------------------------------

_SHORTCUTS = (("epochs", int), ("batch_size", int), ("lr", float), ("teacher", str), ("data", str), ("seed", int))


def train_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qvit-train", description="Train an FP teacher or a Q-ViT student (QAT with IRM "
                                "and DGD) from a recipe; one process, or many under torchrun.")
    p.add_argument("--recipe", help="models/<name>.yaml by name, or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (repeatable; augment.KEY for augmentation), e.g. --set w_bits=3")
    for key, kind in _SHORTCUTS:
        p.add_argument("--" + key.replace("_", "-"), type=kind, help=f"same as --set {key}=...")
    p.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    p.add_argument("--resume", help="a run's last.pt: continue that run exactly where it stopped")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs and CI)")
    p.add_argument("--pretrained", action="store_true",
                   help="allow the download of timm's pretrained weights that the recipe asks for (teacher: "
                        "pretrained, or pretrained: true); without it such a recipe is refused")
    p.add_argument("--print-recipe", action="store_true",
                   help="print the resolved recipe (defaults, the file and what it extends, overrides) and exit")
    return p


def train_main(argv=None) -> int:
    args = train_parser().parse_args(argv)
    from .recipe import Recipe, load_recipe, parse_override

    overrides = dict(parse_override(text) for text in args.set)
    overrides |= {key: getattr(args, key) for key, _ in _SHORTCUTS if getattr(args, key) is not None}
    resume = None
    if args.resume:
        if args.recipe or overrides:
            raise QvitError("--resume continues the saved recipe unchanged: drop --recipe, --set and the shortcuts")
        from .trainer import read_resume

        resume = read_resume(args.resume)
        recipe = Recipe.from_saved(resume["extra"]["recipe"])
        out = Path(args.out) if args.out else Path(args.resume).parent
    else:
        if not args.recipe:
            raise QvitError("give --recipe (a name in models/ or a YAML file), or --resume RUN/last.pt")
        recipe = load_recipe(args.recipe, overrides)
        out = Path(args.out or Path("runs") / recipe.name)
        if (out / "last.pt").exists() and not args.print_recipe:
            raise QvitError(f"{out} already holds a run: continue it with --resume {out / 'last.pt'}, or choose "
                            "another --out")
    if recipe.hub_download() and not args.pretrained and not args.print_recipe:
        raise QvitError(f"the recipe asks for timm's pretrained download ({recipe.hub_download()}), a network "
                        "connection: add --pretrained to allow it, or give a local weights file instead")
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
        return 0
    from .trainer import train

    result = train(recipe, out, resume=resume, progress=not args.no_progress)
    best = result["best"]
    if best is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"best: epoch {best['epoch']}, val top-1 {best['val_top1']:.2f}% -> {out / 'best.pt'} "
              f"(metrics {out / 'metrics.csv'}, curves {out / 'curves.png'})")
    return 0


# ---- qvit-report ------------------------------------------------------------------------------------

def report_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qvit-report", description="OPs (Bi-Real/Q-DETR and BOPs/64 conventions) and "
                                "model size, per layer and in total, of a checkpoint or a timm model at given bits; "
                                "with --attention, where a quantized student's attention departs from its FP "
                                "teacher's, block by block.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a qvit-export checkpoint (its own bits)")
    src.add_argument("--model", help="a timm model name of a supported family (ViT/DeiT, Swin, EVA-02, Swin V2)")
    p.add_argument("--bits", type=int, choices=SUPPORTED_BITS, help="weight and activation bits for --model")
    p.add_argument("--w-bits", type=int, choices=SUPPORTED_BITS, help="weight bits (default: --bits)")
    p.add_argument("--a-bits", type=int, choices=SUPPORTED_BITS, help="activation bits (default: --bits)")
    p.add_argument("--layers", action="store_true", help="print every layer")
    p.add_argument("--json", help="also write the report (with every layer) here")
    a = p.add_argument_group("attention diagnostics (--ckpt of a quantized student)")
    a.add_argument("--attention", action="store_true",
                   help="per attention block: entropy of the quantized q/k codes, KL of the attention rows from the "
                        "teacher's, attention distance of student and teacher, DGD distance (JSON key 'attention', "
                        "and a PNG beside --json)")
    a.add_argument("--teacher", help="the FP teacher the student was trained from (our FP checkpoint, or a timm "
                   "weights file of the student's model)")
    a.add_argument("--data", default="fashion-mnist", help="fashion-mnist (test split), photos, or an image folder")
    a.add_argument("--images", type=_int_in(1), default=1000, help="how many images (default 1000)")
    a.add_argument("--dgd-form", choices=("cosine", "gram-row", "gram"),
                   help="the form of the 'dgd' field (default: the student's recipe's, else cosine; every form is in "
                        "'dgd_forms')")
    return p


def _attention_report(args, model) -> dict:
    """qvit-report --attention: the diagnostics of ``model`` (a quantized checkpoint) against --teacher."""
    from .attention import attention_diagnostics, table
    from .fp_models import Names, load_fp_model
    from .data import parity_images

    if getattr(model, "qvit_config", None) is None:
        raise QvitError(f"--attention needs a quantized student: {args.ckpt} is an FP model (give it as --teacher)")
    source = model.qvit_source
    teacher = load_fp_model(source["name"], source["kwargs"], args.teacher, names=Names("--teacher", "--ckpt's model",
                                                                                        "--ckpt's model arguments"))
    recipe = (model.qvit_checkpoint["extra"].get("recipe") or {})
    form = args.dgd_form or recipe.get("dgd_form", "cosine")
    images, what = parity_images(args.data, model, args.images, flag="--data")
    entries = attention_diagnostics(model, teacher, images, dgd_form=form)
    print(f"attention of {args.ckpt} against the teacher {args.teacher} on {what}:")
    print(table(entries))
    return {"teacher": str(args.teacher), "data": args.data, "images": int(images.shape[0]), "dgd_form": form,
            "attention": entries}


def report_main(argv=None) -> int:
    args = report_parser().parse_args(argv)
    from .config import QuantConfig
    from .report import report

    if args.attention and not (args.ckpt and args.teacher):
        raise QvitError("--attention compares a quantized student with its FP teacher: give --ckpt STUDENT and "
                        "--teacher TEACHER")
    if not args.attention and args.teacher:
        raise QvitError("--teacher is for --attention: add --attention, or drop --teacher")
    plot_path = Path(args.json).with_suffix(".png") if args.attention and args.json else None
    if args.json:
        from .transaction import check_paths

        check_paths({"--json": args.json, "plot": plot_path}, {"--ckpt": args.ckpt, "--teacher": args.teacher})
    if args.ckpt:
        from .checkpoint import load_checkpoint

        if args.bits or args.w_bits or args.a_bits:
            raise QvitError("--ckpt carries its own bit widths: drop --bits/--w-bits/--a-bits")
        model = load_checkpoint(args.ckpt)
        name, cfg = model.qvit_source["name"], getattr(model, "qvit_config", None)
    else:
        from .timm_models import create_model

        w_bits, a_bits = args.w_bits or args.bits, args.a_bits or args.bits
        if (w_bits is None) != (a_bits is None):
            raise QvitError("give both weight and activation bits (--bits, or --w-bits and --a-bits)")
        model, name = create_model(args.model), args.model
        from .families import family_for_model

        family_for_model(model, f"--model {name}")
        cfg = QuantConfig(w_bits=w_bits, a_bits=a_bits) if w_bits else None
    result = report(model, cfg, name)
    if args.layers:
        print(result.layer_table())
    s = result.summary()
    bits = f"W{s['w_bits']}A{s['a_bits']}" if s["w_bits"] else "FP32"
    print(f"{name} {bits}: FP {s['fp_gflops']:.3f} GFLOPs -> OPs {s['ops_g']:.3f} G ({s['ops_reduction']:.2f}x fewer), "
          f"BOPs/64 {s['bops64_g']:.3f} G ({s['bops_reduction']:.2f}x); size {s['fp_mb']:.2f} MB -> {s['q_mb']:.2f} MB "
          f"({s['size_reduction']:.2f}x)")
    data = result.to_dict()
    if args.attention:
        data |= _attention_report(args, model)
    if args.json:
        from .atomic import write_text

        write_text(args.json, json.dumps(data, indent=2, allow_nan=False))
        if plot_path is not None:
            from .attention import plot

            plot(data["attention"], plot_path, title=f"{Path(args.ckpt).name} against {Path(args.teacher).name} "
                                                     f"({data['images']} images of {args.data})")
            print(f"wrote {args.json} and {plot_path}")
    return 0


# ---- qvit-eval --------------------------------------------------------------------------------------

def eval_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qvit-eval", description="top-1/top-5 and loss of a checkpoint (PyTorch), "
                                "an ONNX model (ONNX Runtime) or a TensorRT engine (GPU), measured the same way.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a qvit-export checkpoint")
    src.add_argument("--onnx", help="an exported ONNX model")
    src.add_argument("--engine", help="a TensorRT plan (needs a CUDA GPU)")
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist (test split) or an image folder")
    p.add_argument("--model-ckpt", help="for an image folder with --onnx/--engine: the checkpoint whose transforms "
                   "to use")
    p.add_argument("--batch-size", type=_int_in(1), default=250, help="images per batch (default 250)")
    p.add_argument("--limit", type=_int_in(1), help="evaluate only the first N images")
    p.add_argument("--json", help="also write the metrics here")
    _add_image_limit(p)
    return p


def eval_main(argv=None) -> int:
    args = eval_parser().parse_args(argv)
    import torch
    from torch.utils.data import DataLoader, Subset

    from .checkpoint import load_checkpoint
    from .data import evaluation_dataset
    from .evaluation import evaluate

    reference = load_checkpoint(args.ckpt or args.model_ckpt) if (args.ckpt or args.model_ckpt) else None
    if args.data != "fashion-mnist" and reference is None:
        raise QvitError("an image folder needs --model-ckpt (or --ckpt) to know the model's input transform")
    if args.model_ckpt and args.ckpt:
        raise QvitError("--model-ckpt is for --onnx/--engine: with --ckpt, drop it")
    if args.json:
        from .transaction import check_paths

        check_paths({"--json": args.json}, {"--ckpt": args.ckpt, "--onnx": args.onnx, "--engine": args.engine,
                                            "--model-ckpt": args.model_ckpt})
    dataset = evaluation_dataset(args.data, reference, max_image_bytes=_image_bytes(args))
    if args.limit:
        dataset = Subset(dataset, range(min(args.limit, len(dataset))))
    loader = DataLoader(dataset, batch_size=args.batch_size)
    if args.ckpt:
        model, source = reference, f"PyTorch {args.ckpt}"
    elif args.onnx:
        from .parity import OnnxModule

        model, source = OnnxModule(args.onnx), f"ONNX Runtime {args.onnx}"
    else:
        from .engine import EngineModule

        model, source = EngineModule(args.engine), f"TensorRT {args.engine}"
    with torch.no_grad():
        metrics = evaluate(model, loader, desc="eval")
    metrics["source"] = source
    print(f"{source}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
          f"({metrics['images']} images of {args.data})")
    if args.json:
        from .atomic import write_text

        if not math.isfinite(metrics["loss"]):
            raise QvitError(f"{source} gives a loss of {metrics['loss']} (NaN or infinite logits): the model is "
                            f"broken; {args.json} was not written")
        write_text(args.json, json.dumps(metrics, indent=2, allow_nan=False))
    return 0


def qvit_export() -> None:
    sys.exit(_run(export_main, None))


def qvit_train() -> None:
    sys.exit(_run(train_main, None))


def qvit_report() -> None:
    sys.exit(_run(report_main, None))


def qvit_eval() -> None:
    sys.exit(_run(eval_main, None))


def qvit_quantize() -> None:
    sys.exit(_run(quantize_main, None))


def qvit_calib() -> None:
    sys.exit(_run(calib_main, None))
