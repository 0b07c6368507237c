"""qvit-train's engine: FP training (a teacher) and Q-ViT QAT (teacher → quantize → calibrate → train with
CE + logit distillation + DGD), on one process or many (torchrun: NCCL on GPUs, gloo on the CPU).

What a run directory holds: recipe.yaml (the resolved recipe), metrics.csv (one row per epoch), last.pt (the
whole training state, every epoch), best.pt (the best validation top-1 so far), curves.png (at the end).
All written by rank 0, atomically.

Exact resume: data order is DistributedSampler's (seed, epoch); augmentation is seeded per sample
(train_data.SeededAugment); every other random stream is re-seeded from (seed, rank, epoch) at each epoch
start. So an epoch's randomness never depends on what ran before it, and a run resumed from last.pt
replays the interrupted epoch exactly (model, optimizer, scheduler and best metric come from the file).
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from .atomic import write_text
from .calibrate import calibrate
from .checkpoint import read_checkpoint, save_checkpoint
from .config import QuantConfig
from .distill import dgd_loss, logit_distillation, tapped
from .errors import QvitError
from .quantize import clamp_steps, quantize, set_quantizers_enabled
from .recipe import Recipe, dgd_on
from .evaluation import evaluation_sums, metrics_from_sums
from .train_data import set_epoch, training_data
from .untrusted import check_finite

CSV_FIELDS = ("epoch", "lr", "train_loss", "train_ce", "train_kd", "train_dgd", "val_top1", "val_top5", "val_loss",
              "images_per_s", "seconds")


# ---- processes -------------------------------------------------------------------------------------

class Processes:
    """This process's place in a torchrun job (or a job of one)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """Where the run trains, as its checkpoints record it: 'cpu x1', 'cuda (NVIDIA H200) x8' (a run resumed
        elsewhere records where it saved last)."""
        kind = "cpu" if self.device.type == "cpu" else f"{self.device.type} ({torch.cuda.get_device_name(self.device)})"
        return f"{kind} x{self.world}"

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.to(self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t)
        return t.cpu()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int, rank: int = 0, epoch: int = 0) -> None:
    value = hash((seed, rank, epoch)) & 0x7FFF_FFFF
    torch.manual_seed(value)
    random.seed(value)


# ---- models ----------------------------------------------------------------------------------------

def load_teacher(recipe: Recipe) -> nn.Module:
    """The FP teacher: our FP checkpoint, a timm weights file (with the recipe's model), or timm's pretrained."""
    from .fp_models import Names, load_fp_model

    spec, pretrained = recipe.teacher, recipe.teacher == "pretrained"
    if not spec:
        raise QvitError("a QAT recipe needs teacher: our FP checkpoint, a timm weights file, or pretrained")
    return load_fp_model(recipe.model, recipe.model_kwargs, None if pretrained else spec, pretrained,
                         names=Names("teacher", "model", "recipe model_kwargs"))


def calibration_set(recipe: Recipe, progress: bool = True):
    """The recipe's calibration set: its manifest, or a class-balanced draw of ``calibration_images`` training
    images with the recipe's seed."""
    from .calibration_set import FashionMnistSource, FolderSource, draw, read_manifest

    if recipe.calibration_set:
        return read_manifest(recipe.calibration_set)
    source = FashionMnistSource("train") if recipe.data == "fashion-mnist" else FolderSource(recipe.data)
    return draw(source, recipe.calibration_images, recipe.seed, balanced=True,
                name=f"{recipe.name}-calibration", progress=progress)


def read_resume(path) -> dict:
    """A run's last.pt, checked to hold the training state that --resume needs."""
    saved = read_checkpoint(path)
    if "train_state" not in saved["extra"]:
        raise QvitError(f"{path} holds no training state: resume from a run's last.pt, not best.pt")
    return saved


def fp_model(recipe: Recipe) -> nn.Module:
    """The model an FP run trains: random, from a local weights file, or timm's pretrained weights
    (fp_models.load_fp_model), with the recipe's drop-path rate."""
    from .fp_models import Names, load_fp_model

    kwargs = dict(recipe.model_kwargs) | ({"drop_path_rate": recipe.drop_path} if recipe.drop_path else {})
    return load_fp_model(recipe.model, kwargs, recipe.weights, recipe.pretrained,
                         names=Names("weights", "model", "recipe model_kwargs"))


def frozen_fp_teacher(teacher: nn.Module) -> nn.Module:
    """``teacher`` turned, in place, into its quantizable form with every quantizer off: bit-identical to the FP
    model, and it has the q/k taps DGD reads."""
    twin = quantize(teacher, QuantConfig(w_bits=8, a_bits=8, irm=False), inplace=True)
    set_quantizers_enabled(twin, False)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin.eval()


def param_groups(model: nn.Module, weight_decay: float, lr: float, step_lr_scale: float = 1.0,
                 irm_lr_scale: float = 1.0) -> list[dict]:
    """Weight decay on weight matrices only: not on biases, norms, quantizer steps, or the parameters the timm model
    itself names (``no_weight_decay()``: tokens, position tables, Swin V2's logit scales and position-bias MLP).
    LSQ steps and IRM parameters get their own learning rates (``lr`` times the scale): Adam moves every
    parameter by about lr per step whatever its size, which is 2% of a 4-bit weight step of 0.01 at lr 2e-4."""
    from .quantize import irm_norms

    irm = {id(p) for _, norm in irm_norms(model) for p in norm.parameters()}
    timm_no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay, steps, irm_params = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".step"):
            steps.append(p)
        elif id(p) in irm:
            irm_params.append(p)
        elif p.ndim <= 1 or name in timm_no_decay:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr},
              {"params": steps, "weight_decay": 0.0, "lr": lr * step_lr_scale},
              {"params": irm_params, "weight_decay": 0.0, "lr": lr * irm_lr_scale}]
    return [g for g in groups if g["params"]]


def make_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, recipe.weight_decay, recipe.lr, recipe.step_lr_scale,
                          recipe.irm_lr_scale)
    if recipe.optimizer == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=recipe.lr)
    return torch.optim.AdamW(groups, lr=recipe.lr)


def make_schedule(recipe: Recipe, optimizer, steps_per_epoch: int):
    """Per-step linear warm-up, then cosine from lr down to min_lr."""
    total = recipe.epochs * steps_per_epoch
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    floor = recipe.min_lr / recipe.lr if recipe.lr else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- one run ---------------------------------------------------------------------------------------

def _resumed(load, what: str) -> None:
    """Load one part of a run's saved state (a file from elsewhere, for all we know): a part that does not fit
    the run's recipe is one line."""
    try:
        load()
    except QvitError:
        raise
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise QvitError(f"--resume: the saved {what} state does not fit the run's recipe ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''}): resume from the last.pt of this "
                        "run") from None


class Trainer:
    """One run. ``resume``: a run's last.pt as ``read_resume`` returns it."""

    def __init__(self, recipe: Recipe, out: Path, resume: dict | None = None, progress: bool = True):
        self.recipe, self.out, self.progress = recipe, Path(out), progress
        self.procs = Processes()
        r = recipe
        state = resume["extra"]["train_state"] if resume else None
        seed_everything(r.seed)
        qat = r.mode == "qat"
        self.use_kd = qat and r.distill != "none"
        self.use_dgd = dgd_on(r.mode, r.dgd, r.dgd_weight)

        # Models: the student starts from the teacher's weights, then is calibrated (unless resuming).
        self.teacher = None
        if qat:
            fp = load_teacher(r)
            self.model = quantize(fp, r.quant)
            if self.use_kd or self.use_dgd:
                self.teacher = frozen_fp_teacher(fp).to(self.procs.device)
        else:
            self.model = fp_model(r)
        self.train_set, self.val_set = training_data(r, self.model)
        if qat and state is None:
            calib_set = calibration_set(r, progress)
            if self.procs.main:  # the run says which images calibrated it
                write_text(self.out / "calibration.json", calib_set.to_json())
            calibrate(self.model, calib_set, irm_steps=r.irm_steps, seed=r.seed, progress=progress)
        if state is not None:
            _resumed(lambda: self.model.load_state_dict(resume["state_dict"]), "model")
            check_finite(self.model, "--resume")
        self.model.to(self.procs.device)
        if hasattr(self.model, "set_distilled_training"):  # DeiT's distillation token trains on the teacher
            self.model.set_distilled_training(self.use_kd)

        # Data loading: one global batch split evenly, the same samples per step whatever the process count.
        if r.batch_size % self.procs.world:
            raise QvitError(f"batch_size {r.batch_size} does not split over {self.procs.world} processes: "
                            "make it a multiple of --nproc_per_node")
        self.sampler = DistributedSampler(self.train_set, num_replicas=self.procs.world, rank=self.procs.rank,
                                          shuffle=True, seed=r.seed, drop_last=True)
        workers = 0 if r.data == "fashion-mnist" else r.workers
        self.loader = DataLoader(self.train_set, batch_size=r.batch_size // self.procs.world, sampler=self.sampler,
                                 drop_last=True, num_workers=workers, pin_memory=self.procs.device.type == "cuda",
                                 persistent_workers=False)
        if len(self.loader) == 0:
            raise QvitError(f"batch_size {r.batch_size} is larger than the {len(self.train_set)} training images: "
                            "lower batch_size or raise train_limit")
        self.val_loader = DataLoader(Subset(self.val_set, range(self.procs.rank, len(self.val_set), self.procs.world)),
                                     batch_size=r.eval_batch_size, num_workers=workers)

        self.optimizer = make_optimizer(r, self.model)
        self.schedule = make_schedule(r, self.optimizer, len(self.loader))
        cuda = self.procs.device.type == "cuda"
        self.amp_dtype = getattr(torch, r.amp_dtype) if cuda and r.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)
        self.start_epoch, self.best, self.history, self.step_losses = 0, None, [], []
        if state is not None:
            _resumed(lambda: self.optimizer.load_state_dict(state["optimizer"]), "optimizer")
            _resumed(lambda: self.schedule.load_state_dict(state["scheduler"]), "scheduler")
            _resumed(lambda: self.scaler.load_state_dict(state["scaler"]), "grad scaler")
            self.start_epoch, self.best = state["epoch"], state["best"]
            self.history, self.step_losses = list(state["history"]), list(state["step_losses"])
        self.net = self.model
        if self.procs.world > 1:
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=[self.procs.device] if cuda else None)

    # -- losses --
    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        r = self.recipe
        taps = tapped(self.model, self.teacher) if self.use_dgd else contextlib.nullcontext((None, None))
        with taps as (student_tap, teacher_tap):
            out = self.net(x)
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(x)
            dgd = dgd_loss(student_tap, teacher_tap, r.dgd_form) if self.use_dgd else None
        logits, dist_logits = out if isinstance(out, tuple) else (out, None)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=r.label_smoothing)
        parts = {"ce": ce.detach()}
        loss = ce
        if self.use_kd:
            kd = logit_distillation(dist_logits if dist_logits is not None else logits, teacher_logits, r.distill,
                                    r.distill_tau)
            alpha = 0.5 if dist_logits is not None else r.distill_weight
            loss = (1 - alpha) * ce + alpha * kd
            parts["kd"] = kd.detach()
        if dgd is not None:
            loss = loss + r.dgd_weight * dgd
            parts["dgd"] = dgd.detach()
        return loss, parts

    def _step(self, x, y) -> tuple[torch.Tensor, dict]:
        device = self.procs.device
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            loss, parts = self._loss(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.recipe.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.clip_grad)
        self.scaler.step(self.optimizer)
        if self.recipe.mode == "qat":
            clamp_steps(self.model)  # a step pushed through zero would die (quantize.MIN_STEP)
        self.scaler.update()
        self.schedule.step()
        return loss.detach(), parts

    # -- the loop --
    def run(self) -> dict:
        r, procs = self.recipe, self.procs
        if procs.main:
            write_text(self.out / "recipe.yaml", r.to_yaml())
        if r.mode == "qat" and not self.history:
            self._validate_start()
        for epoch in range(self.start_epoch, r.epochs):
            seed_everything(r.seed, procs.rank, epoch)
            self.sampler.set_epoch(epoch)
            set_epoch(self.train_set, epoch)
            self.net.train()
            # loss, ce, kd, dgd, steps: summed where the loss lives; read back every log_every steps only, so a
            # GPU is not stopped after each step to copy four numbers
            sums = torch.zeros(5, dtype=torch.float64, device=self.procs.device)
            zero = torch.zeros((), device=self.procs.device)
            start = time.perf_counter()
            bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{r.epochs}", unit="batch", leave=False,
                       disable=not (self.progress and procs.main))
            log_every = max(1, len(self.loader) // 50)
            for i, (x, y) in enumerate(bar):
                loss, parts = self._step(x, y)
                step = [loss, parts["ce"], parts.get("kd", zero), parts.get("dgd", zero), torch.ones_like(zero)]
                sums += torch.stack([v.double() for v in step])
                if i % log_every == 0:
                    mean = (sums / sums[4]).tolist()
                    self.step_losses.append([epoch * len(self.loader) + i, loss.item()])
                    bar.set_postfix(loss=f"{mean[0]:.3f}", **({"dgd": f"{mean[3]:.3f}"} if self.use_dgd else {}))
            seconds = time.perf_counter() - start
            sums = procs.sum(sums)
            val = self._validate()
            steps = sums[4].item()
            row = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
                   "train_loss": sums[0].item() / steps, "train_ce": sums[1].item() / steps,
                   "train_kd": sums[2].item() / steps, "train_dgd": sums[3].item() / steps,
                   "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"],
                   "images_per_s": len(self.loader) * r.batch_size / seconds, "seconds": seconds}
            self.history.append(row)
            improved = self.best is None or val["top1"] > self.best["val_top1"]
            if improved:
                self.best = dict(row)
            if procs.main:
                self._save(epoch + 1, val, improved)
                print(f"epoch {epoch + 1}/{r.epochs}: loss {row['train_loss']:.4f}  val top-1 {val['top1']:.2f}%  "
                      f"top-5 {val['top5']:.2f}%  {row['images_per_s']:.0f} img/s", flush=True)
            procs.barrier()
        if procs.main:
            from .plots import plot_training

            plot_training(self.history, self.step_losses, len(self.loader), self.out / "curves.png", title=r.name)
        return {"best": self.best, "history": self.history, "out": str(self.out)}

    def _validate(self) -> dict:
        return metrics_from_sums(self.procs.sum(evaluation_sums(self.model, self.val_loader, desc="validate",
                                                                progress=self.progress and self.procs.main)))

    def _validate_start(self) -> None:
        """Epoch 0: the calibrated student before any QAT step, validated and saved like an epoch (the curve shows
        where QAT began; a run killed in epoch 1 resumes without calibrating again). It is the best so far."""
        val = self._validate()
        row = {field: None for field in CSV_FIELDS} | {"epoch": 0, "lr": self.optimizer.param_groups[0]["lr"],
                                                       "val_top1": val["top1"], "val_top5": val["top5"],
                                                       "val_loss": val["loss"]}
        self.history.append(row)
        self.best = dict(row)
        if self.procs.main:
            self._save(0, val, improved=True)
            print(f"epoch 0/{self.recipe.epochs} (calibrated start): val top-1 {val['top1']:.2f}%  "
                  f"top-5 {val['top5']:.2f}%", flush=True)
        self.procs.barrier()

    def _save(self, epoch: int, val: dict, improved: bool) -> None:
        r = self.recipe
        extra = {"recipe": r.to_dict(), "dataset": r.data, "epoch": epoch, "device": self.procs.describe()}
        if improved:
            save_checkpoint(self.out / "best.pt", self.model, metrics=val, extra=extra)
        state = {"epoch": epoch, "optimizer": self.optimizer.state_dict(), "scheduler": self.schedule.state_dict(),
                 "scaler": self.scaler.state_dict(), "best": self.best, "history": self.history,
                 "step_losses": self.step_losses}
        save_checkpoint(self.out / "last.pt", self.model, metrics=val, extra=extra | {"train_state": state})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(self.history)
        write_text(self.out / "metrics.csv", buffer.getvalue())


RUN_FILES = ("recipe.yaml", "calibration.json", "last.pt", "best.pt", "metrics.csv", "curves.png")  # what a run writes in its folder


def train(recipe: Recipe, out, resume: dict | None = None, progress: bool = True) -> dict:
    """Run (or resume, from ``read_resume(last.pt)``) one training run; returns the best epoch's row and the
    history."""
    from .transaction import locked_outputs

    out = Path(out)
    files = {f"run file {name}": out / name for name in RUN_FILES}
    # rank 0 writes every file: it alone locks them (a second run to the same folder refuses at once)
    with locked_outputs(files) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
        trainer = Trainer(recipe, out, resume, progress)
        try:
            return trainer.run()
        finally:
            trainer.procs.close()


def saved_run(out: Path, recipe: Recipe) -> dict | None:
    """The training state (``read_resume`` of last.pt) of a run of this very recipe in ``out``, else None. A run
    saved before a recipe key existed counts as today's recipe with that key at its default."""
    try:
        state = read_resume(out / "last.pt")
    except QvitError:
        return None
    return state if recipe.trains_as(state["extra"].get("recipe", {})) else None


_UNREAD = object()


def finished_run(out: Path, recipe: Recipe, state=_UNREAD) -> Path | None:
    """best.pt of a run in ``out`` that finished this very recipe, else None (``state``: its ``saved_run``, when
    already read, None included: a run found missing is not read again)."""
    state = saved_run(out, recipe) if state is _UNREAD else state
    done = state is not None and state["extra"]["epoch"] == recipe.epochs
    return out / "best.pt" if done and (out / "best.pt").is_file() else None


def train_or_reuse(recipe: Recipe, out, progress: bool = True) -> Path:
    """best.pt of ``recipe`` in ``out``: reused when a finished run of it is there, continued exactly where it
    stopped when an unfinished one is (long benchmarks carry over from one session to the next), else trained
    (a run of another recipe in ``out`` is replaced)."""
    out = Path(out)
    state = saved_run(out, recipe)
    best = finished_run(out, recipe, state)
    if best is not None:
        print(f"reusing {best} ({recipe.name})")
        return best
    resume = state if state is not None and state["extra"]["epoch"] < recipe.epochs else None
    if resume is not None:
        print(f"resuming {out} ({recipe.name}) after epoch {resume['extra']['epoch']} of {recipe.epochs}",
              flush=True)
    else:
        for stale in ("last.pt", "best.pt", "metrics.csv"):
            (out / stale).unlink(missing_ok=True)
    train(recipe, out, resume=resume, progress=progress)
    return out / "best.pt"
