"""qvit-export: Q-ViT quantization-aware training of timm vision transformers, and deployment."""
from .calibrate import calibrate
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .config import QuantConfig
from .errors import QvitError
from .quantize import quantize, quantizers, quantizers_disabled, set_quantizers_enabled
from .timm_models import create_model

__version__ = "0.1.0"

__all__ = [
    "QuantConfig", "QvitError", "calibrate", "create_model", "load_checkpoint", "quantize", "quantizers",
    "quantizers_disabled", "read_checkpoint", "save_checkpoint", "set_quantizers_enabled", "__version__",
]
