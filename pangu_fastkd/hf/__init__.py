"""Hugging Face interoperability (optional extra ``hf``): transformers models with our kernels.

Importing this package does not import transformers; each function that needs it calls
``require_transformers()``, which raises ``MissingHFExtraError`` with the install hint.
"""

from __future__ import annotations

from ._require import HF_EXTRA_HINT, MissingHFExtraError, require_transformers

__all__ = ["HF_EXTRA_HINT", "MissingHFExtraError", "require_transformers"]
