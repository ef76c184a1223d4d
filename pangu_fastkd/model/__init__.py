"""The decoder: configuration, packed-row model, Hugging Face-style checkpoints, generation."""

from .checkpoint import load_pretrained, save_pretrained
from .config import ModelConfig
from .generation import Generation, GenerationConfig, generate
from .modeling import DecoderLM, init_weights

__all__ = [
    "DecoderLM",
    "Generation",
    "GenerationConfig",
    "ModelConfig",
    "generate",
    "init_weights",
    "load_pretrained",
    "save_pretrained",
]
