"""Without the hf extra, pangu_fastkd.hf imports and its HF paths say which extra to install."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import pangu_fastkd.hf as hf
from pangu_fastkd.hf import _require


def test_the_package_imports_without_importing_transformers() -> None:
    # transformers is optional: importing pangu_fastkd.hf (in a fresh interpreter) must not load it.
    code = "import sys, pangu_fastkd.hf; print('transformers' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_a_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def import_module(name: str, *args, **kwargs):
        if name == "transformers":
            raise ModuleNotFoundError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(_require.importlib, "import_module", import_module)
    with pytest.raises(hf.MissingHFExtraError, match=r"pip install -e '\.\[hf\]'"):
        hf.require_transformers()
    assert issubclass(hf.MissingHFExtraError, ImportError)


def test_an_installed_transformers_is_returned() -> None:
    transformers = pytest.importorskip("transformers")
    assert hf.require_transformers() is transformers
