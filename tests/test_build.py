"""The CMake build (CMakeLists.txt) compiles the same extension that setup.py builds.

setup.py is what `pip install -e .` runs and the rest of the suite uses; this test keeps the
CMake path, meant for C++ work and the Ascend build, from rotting. It configures and builds in a
temporary directory and loads the result in a fresh process (loading it here would register the
ops a second time).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cmake_builds_the_extension(tmp_path: Path) -> None:
    build = tmp_path / "build"
    configure = [
        "cmake",
        "-S",
        str(REPO),
        "-B",
        str(build),
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DPython3_EXECUTABLE={sys.executable}",
    ]
    subprocess.run(configure, check=True, capture_output=True, text=True)
    subprocess.run(
        ["cmake", "--build", str(build), "-j2"], check=True, capture_output=True, text=True
    )
    module = build / "_C.so"
    assert module.is_file()
    probe = textwrap.dedent(
        f"""
        import importlib.util, torch
        spec = importlib.util.spec_from_file_location("_C", {str(module)!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        h, w = torch.randn(4, 8), torch.randn(16, 8)
        y = torch.tensor([1, 2, -100, 3])
        out = torch.ops.pangu_fastkd.sparse_kd_fused(
            h, w, None, y, None, None, None, None, None, 0.0, 0, 0.5, 1.0, 1.0, 0, False,
            -100, 0.0, 0.0, 1, 0.0, 0, False, False, False)
        ref = torch.nn.functional.cross_entropy(h @ w.T, y)
        assert torch.allclose(out[0], ref, rtol=1e-5), (out[0], ref)
        print(mod.build_info()["vector_isa"])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    )
    assert result.stdout.strip() in ("avx512", "avx2", "scalar")
