"""The one place that imports transformers for the Hugging Face integration.

transformers is an optional dependency (``pip install -e .[hf]``); everything outside
``pangu_fastkd.hf`` works without it, and every HF path raises the same clear error when it is
missing instead of an ImportError from deep inside a call.
"""

from __future__ import annotations

import importlib
from types import ModuleType

HF_EXTRA_HINT = "install the hf extra: pip install -e '.[hf]' (adds transformers and tokenizers)"


class MissingHFExtraError(ImportError):
    """transformers (or tokenizers) is not installed, and an HF code path needs it."""


def require_transformers() -> ModuleType:
    """The ``transformers`` module, or ``MissingHFExtraError`` naming the extra to install."""
    try:
        return importlib.import_module("transformers")
    except ImportError as err:  # ModuleNotFoundError, or a broken install
        raise MissingHFExtraError(
            f"this needs transformers, which is not importable: {err}; {HF_EXTRA_HINT}"
        ) from err
