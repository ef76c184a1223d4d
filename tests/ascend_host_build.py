"""Building the Ascend C host code as a CPU twin module, once per chip per test session.

The host code (csrc/ascend/host/*.cpp), the kernel entry points (csrc/ascend/*.cpp) and the twin
launchers are compiled with ``PANGU_FASTKD_ASCEND_TWIN`` against stand-ins for the CANN and
torch_npu headers (csrc/ascend/host/twin) and the CPU twin of the Ascend C API (csrc/ascend/twin):
one module per chip holds every op, and the host tests of all ops share it (each compile costs
tens of seconds). See csrc/ascend/host/twin/README.md.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType

import pytest
from torch.utils import cpp_extension

from pangu_fastkd import _native

REPO = Path(__file__).resolve().parents[1]
# The kernel entry point stems, as cmake/ascend.cmake lists them in build_info()["kernels"].
KERNELS = ("packed_attention_bwd", "packed_attention_fwd", "sparse_kd_epilogue")
SOURCES = (
    "csrc/ascend/host/module.cpp",
    "csrc/ascend/host/packed_attention_npu.cpp",
    "csrc/ascend/host/sparse_kd_npu.cpp",
    *(f"csrc/ascend/{stem}.cpp" for stem in KERNELS),
    "csrc/ascend/host/twin/twin_launchers.cpp",
)
INCLUDES = ("csrc/ascend/host/twin", "csrc/ascend/twin", "csrc/ascend", "csrc")
# The chips the host tests build for: several blocks on the 910B, one on the 310B.
SOC_910B = "Ascend910B1"
SOC_310B = "Ascend310B4"

needs_host_twin = [
    pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed"),
    pytest.mark.skipif(not _native.native_available(), reason="C++ extension not built"),
]

_built: dict[str, ModuleType] = {}


def host_twin(soc: str, tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The twin host module for ``soc`` (e.g. "Ascend910B1"), compiled on first use.

    The chip is a compile definition, as in the real build: the host takes its tiling budget and
    platform from it, and the twin launchers the chip they run ``twin::Launch`` on.
    """
    if soc not in _built:
        out = tmp_path_factory.mktemp(f"ascend_host_{soc.lower()}")
        _built[soc] = cpp_extension.load(
            name=f"pangu_fastkd_ascend_twin_{soc.lower()}",
            sources=[str(REPO / s) for s in SOURCES],
            extra_include_paths=[str(REPO / i) for i in INCLUDES],
            extra_cflags=[
                "-O1",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-DPANGU_FASTKD_ASCEND_TWIN",
                # Escaped quotes: ninja runs the compiler through the shell.
                f'-DPANGU_FASTKD_SOC_VERSION=\\"{soc}\\"',
                f'-DPANGU_FASTKD_ASCEND_KERNELS=\\"{",".join(KERNELS)},\\"',
            ],
            build_directory=str(out),
            verbose=False,
        )
    return _built[soc]
