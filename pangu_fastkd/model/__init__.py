"""The decoder: configuration, packed-row model, Hugging Face-style checkpoints, generation."""

from .checkpoint import load_pretrained, save_pretrained
from .config import ModelConfig
from .modeling import DecoderLM, init_weights
from .sampling import Generation, GenerationConfig

__all__ = [
    "DecoderLM",
    "Generation",
    "GenerationConfig",
    "ModelConfig",
    "init_weights",
    "load_pretrained",
    "save_pretrained",
]
