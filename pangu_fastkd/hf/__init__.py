"""Hugging Face interoperability (optional extra ``hf``): transformers models with our kernels.

Importing this package does not import transformers; each function that needs it calls
``require_transformers()``, which raises ``MissingHFExtraError`` with the install hint.
"""

from __future__ import annotations

from ._require import HF_EXTRA_HINT, MissingHFExtraError, require_transformers
from .attention import packed_attention_forward, packed_attention_mask, register_attention
from .chat import ChatRenderer, HFChatTemplate, TemplatePrefixError, template_for
from .loss import LMHead, causal_lm_loss, lm_head_parts, shift_causal_labels
from .model import HFCausalLM, HFModelConfig, load_hf_causal_lm

__all__ = [
    "HF_EXTRA_HINT",
    "ChatRenderer",
    "HFCausalLM",
    "HFChatTemplate",
    "HFModelConfig",
    "LMHead",
    "MissingHFExtraError",
    "TemplatePrefixError",
    "causal_lm_loss",
    "lm_head_parts",
    "load_hf_causal_lm",
    "packed_attention_forward",
    "packed_attention_mask",
    "register_attention",
    "require_transformers",
    "shift_causal_labels",
    "template_for",
]
