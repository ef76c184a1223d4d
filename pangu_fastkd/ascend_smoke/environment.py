"""What a bug report needs about the machine: versions, the build, the CANN toolkit, the chip."""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import torch

from .. import __version__, _native
from .._ascend_build import DEFAULT_CANN_PATH
from .errors import first_line
from .op_backends import Backend

# Environment variables naming the CANN toolkit, in the order set_env.sh users have them.
CANN_ENV_VARS = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "ASCEND_CANN_PACKAGE_PATH")
# Where a CANN root keeps its version, most specific first (``<arch>-linux/`` in CANN 7/8).
VERSION_FILES = (
    "version.info",
    "*/ascend_toolkit_install.info",
    "compiler/version.info",
    "runtime/version.info",
)


def cann_version(
    env: Mapping[str, str] | None = None, default_root: str = DEFAULT_CANN_PATH
) -> tuple[str, str]:
    """The CANN toolkit version and the file it was read from, or ``"unknown"`` and why.

    Looks in ``$ASCEND_HOME_PATH``, ``$ASCEND_TOOLKIT_HOME``, ``$ASCEND_CANN_PACKAGE_PATH`` and
    ``default_root``, in that order, for the first file with a ``version=`` line among
    ``version.info``, ``*/ascend_toolkit_install.info`` (``<arch>-linux/`` in CANN 7/8),
    ``compiler/version.info`` and ``runtime/version.info``.

    Returns:
        ``(version, source)``: source is the file's path, or the reason when nothing was found.
    """
    env = os.environ if env is None else env
    roots = [env[name] for name in CANN_ENV_VARS if env.get(name)] + [default_root]
    tried = []
    for root in dict.fromkeys(roots):  # ordered, without repeats
        if not os.path.isdir(root):
            tried.append(f"{root} (no such directory)")
            continue
        tried.append(root)
        for pattern in VERSION_FILES:
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                version = _read_version_line(path)
                if version:
                    return version, path
    return "unknown", "no version.info or ascend_toolkit_install.info with a version= line in " + (
        ", ".join(tried)
    )


def _read_version_line(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition("=")
                if sep and key.strip().lower() == "version" and value.strip():
                    return value.strip()
    except OSError:
        return None
    return None


def environment(backend: Backend) -> dict[str, Any]:
    """Everything a bug report needs about the machine, the build and the device."""
    torch_npu = sys.modules.get("torch_npu")
    version, source = cann_version()
    info: dict[str, Any] = {
        "pangu_fastkd": __version__,
        "build_info": _native.build_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_npu": getattr(torch_npu, "__version__", "not loaded") if torch_npu else "not loaded",
        "cann_version": version,
        "cann_version_source": source,
        "backend": backend.name,
    }
    try:
        info.update(backend.describe())
    except Exception as exc:
        info["describe_error"] = first_line(exc)
    smi = _npu_smi()
    if smi:
        info["npu_smi"] = smi
    return info


def _npu_smi() -> str | None:
    """``npu-smi info`` when the tool is installed (optional: never needed, never fatal)."""
    if shutil.which("npu-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["npu-smi", "info"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"npu-smi info failed: {first_line(exc)}"
    return (done.stdout or done.stderr).rstrip()
