"""Reading files written by torch.save that a user hands us: ``torch.load(weights_only=True)`` (no pickle code),
the zip checked first (untrusted.check_zip), every failure one line, and a state dict's entries checked to be plain
tensors. Below both checkpoint.py (our checkpoints) and timm_models.py (timm weights files), which read through it.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .errors import QvitError
from .untrusted import check_tensor, check_zip, plain_data, shown

CHECKPOINT_FORMAT = "qvit-export-checkpoint"  # the "format" entry of our checkpoints (checkpoint.py)


def torch_load(path: Path):
    """torch.load with weights_only=True, every failure turned into one line that says what to do."""
    if not path.is_file():
        raise QvitError(f"checkpoint not found: {path}")
    check_zip(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the class it refused ("Unsupported global"); garbage fails on an opcode instead.
        if "global" in str(e).lower():
            raise QvitError(f"{path} needs pickle code to load, which is refused for safety: re-save it as a plain "
                            "state dict or with qvit_export.save_checkpoint") from None
        raise QvitError(f"{path} is truncated or not a PyTorch file (unpickling failed): write the checkpoint "
                        "again") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - damaged files fail in many ways (zip, pickle opcodes, storage sizes)
        raise QvitError(f"{path} is truncated or not a PyTorch file ({type(e).__name__}): write the checkpoint "
                        "again") from None


MAX_EXTRA_STATE_NODES = 64  # a quantizer's or IRM norm's extra state: a few flags and a bit width


def check_state(state, path) -> dict:
    """A state dict read from a file: string keys, each value a plain tensor (untrusted.check_tensor) or, under
    an ``_extra_state`` key, a few plain values."""
    for key, value in state.items():
        if not isinstance(key, str) or len(key) > 1000:
            raise QvitError(f"{path} has a state dict key {shown(key)}: keys are parameter names; the file is damaged")
        if torch.is_tensor(value):
            check_tensor(value, f"{path}: {key}")
        elif key.rsplit(".", 1)[-1] == "_extra_state":
            plain_data(value, f"{path}: {key}", max_nodes=MAX_EXTRA_STATE_NODES)
        else:
            raise QvitError(f"{path}: {key} is a {type(value).__name__}, not a tensor: pass a timm weights file or a "
                            "checkpoint of ours")
    return state


def state_dict_of(obj, path: Path) -> dict:
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj["state_dict"]
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise QvitError(f"{path} holds no state dict of tensors: pass a timm weights file")
    return check_state(obj, path)


def load_state_dict_file(path) -> dict:
    """A plain state dict (or a dict holding one under 'state_dict' or 'model'), e.g. timm FP weights."""
    path = Path(path)
    return state_dict_of(torch_load(path), path)
