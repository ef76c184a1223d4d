"""pangu_fastkd: kernel-first post-training of small language models by knowledge distillation."""

from . import ops
from ._native import build_info, native_available

__all__ = ["build_info", "native_available", "ops"]
__version__ = "0.1.0"
