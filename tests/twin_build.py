"""Compiling the Ascend C twin test programs (tests/ascend_twin/*.cpp) with g++.

Shared by the tests of the twin itself and of each Ascend C kernel: one compile command, one
skip condition (no g++ on the machine), one error message with the compiler's output.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = REPO / "tests" / "ascend_twin"
# The twin's kernel_operator.h, the kernel headers that include it, and csrc for the option
# rules the host tiling shares with the op (common/sparse_kd_rules.h).
INCLUDES = (SOURCES / "include", REPO / "csrc" / "ascend", REPO / "csrc")
VIOLATION_EXIT_CODE = 3  # a twin::HardwareRuleViolation escaped the kernel
TILING_ERROR_EXIT_CODE = 4  # the host tiling rejected the problem

needs_gxx = pytest.mark.skipif(
    shutil.which("g++") is None, reason="g++ is not installed: the Ascend C twin cannot be built"
)


def compile_program(name: str, out_dir: Path) -> Path:
    """Builds ``tests/ascend_twin/<name>.cpp`` into ``out_dir``; returns the binary's path."""
    source, binary = SOURCES / f"{name}.cpp", out_dir / name
    command = ["g++", "-std=c++17", "-O1", "-pthread", "-Wall", "-Wextra", "-Werror"]
    for include in INCLUDES:
        command += ["-I", str(include)]
    command += [str(source), "-o", str(binary)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"compiling {source.name} failed:\n{result.stderr}"
    return binary
