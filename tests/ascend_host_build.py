"""Building the Ascend C host code as a CPU twin module, once per chip per test session.

The host code (csrc/ascend/host/*.cpp), the kernel entry points (csrc/ascend/*.cpp) and the twin
launchers are compiled with ``PANGU_FASTKD_ASCEND_TWIN`` against stand-ins for the CANN and
torch_npu headers (tests/ascend_twin/host) and the CPU twin of the Ascend C API
(tests/ascend_twin/include): one module per chip holds every op, and the host tests of all ops
share it (each compile costs tens of seconds). See tests/ascend_twin/host/README.md.
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
    "tests/ascend_twin/host/twin_launchers.cpp",
)
INCLUDES = ("tests/ascend_twin/host", "tests/ascend_twin/include", "csrc/ascend", "csrc")
# The chips the host tests build for: several blocks on the 910B, one on the 310B.
SOC_910B = "Ascend910B1"
SOC_310B = "Ascend310B4"

needs_host_twin = [
    pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed"),
    pytest.mark.skipif(not _native.native_available(), reason="C++ extension not built"),
]

_built: dict[str, ModuleType] = {}
_build_dirs: dict[str, Path] = {}
# The host sources a variant may edit: the host code's translation units and the header they
# share, copied next to each other so the copies include each other ("npu_launch.h").
HOST_FILES = (
    "csrc/ascend/host/npu_launch.h",
    "csrc/ascend/host/module.cpp",
    "csrc/ascend/host/packed_attention_npu.cpp",
    "csrc/ascend/host/sparse_kd_npu.cpp",
)


def _cflags(soc: str) -> list[str]:
    return [
        "-O1",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-DPANGU_FASTKD_ASCEND_TWIN",
        # Escaped quotes: ninja runs the compiler through the shell.
        f'-DPANGU_FASTKD_SOC_VERSION=\\"{soc}\\"',
        f'-DPANGU_FASTKD_ASCEND_KERNELS=\\"{",".join(KERNELS)},\\"',
    ]


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
            extra_cflags=_cflags(soc),
            build_directory=str(out),
            verbose=False,
        )
        _build_dirs[soc] = out
    return _built[soc]


def host_twin_variant(
    name: str,
    soc: str,
    edits: dict[str, list[tuple[str, str]]],
    tmp_path_factory: pytest.TempPathFactory,
) -> ModuleType:
    """A twin host module whose host sources have ``edits`` applied: a bug put back on purpose.

    ``edits`` maps a path of HOST_FILES to (old, new) replacements; each ``old`` must occur in
    that file exactly as given, so a variant whose bug no longer applies fails to build instead of
    silently testing the unchanged code. Only the host files are compiled again: the kernel
    entry points and the twin launchers are linked from the reference module of ``soc``'s build.
    """
    host_twin(soc, tmp_path_factory)
    reference = _build_dirs[soc]
    src = tmp_path_factory.mktemp(f"{name}_src")
    for rel in HOST_FILES:
        text = (REPO / rel).read_text()
        for old, new in edits.get(rel, []):
            assert text.count(old) >= 1, f"{rel} no longer contains {old!r}"
            text = text.replace(old, new)
        (src / Path(rel).name).write_text(text)
    linked = [reference / f"{Path(s).stem}.o" for s in SOURCES if s not in HOST_FILES]
    return cpp_extension.load(
        name=f"pangu_fastkd_ascend_{name}_{soc.lower()}",
        sources=[str(src / Path(rel).name) for rel in HOST_FILES if rel.endswith(".cpp")],
        extra_include_paths=[str(REPO / i) for i in INCLUDES],
        extra_cflags=_cflags(soc),
        extra_ldflags=[str(o) for o in linked],
        build_directory=str(tmp_path_factory.mktemp(name)),
        verbose=False,
    )
