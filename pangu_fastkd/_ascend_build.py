"""Decides whether ``pip install -e .`` builds the Ascend C kernels, and says why not.

setup.py loads this file by path before the package is importable, so it uses only the standard
library (torch_npu is looked up with ``importlib.util.find_spec``, never imported). The same plan
is what ``pangu_fastkd.build_info()`` reports as the reason a build has no Ascend kernels.

Environment:
  PANGU_FASTKD_WITH_ASCEND  unset: build when CANN and torch_npu are both found; 0: never;
                            1: always, and a missing CANN or torch_npu is an error.
  ASCEND_CANN_PACKAGE_PATH, ASCEND_HOME_PATH
                            the CANN toolkit (``set_env.sh`` sets ASCEND_HOME_PATH); default
                            /usr/local/Ascend/ascend-toolkit/latest.
  SOC_VERSION               target chip, default Ascend910B1 (see KNOWN_SOC_VERSIONS).
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

DEFAULT_CANN_PATH = "/usr/local/Ascend/ascend-toolkit/latest"
DEFAULT_SOC_VERSION = "Ascend910B1"
# The chips the kernels are written for (and the twin emulates): Atlas 800T A2 (910B) and
# Atlas 200I A2 (310B). Other SoCs have different UB sizes and core counts, so they are refused
# rather than compiled for blindly.
KNOWN_SOC_VERSIONS = tuple(f"Ascend910B{i}" for i in range(1, 5)) + tuple(
    f"Ascend310B{i}" for i in range(1, 5)
)
# Where CANN 8.x keeps ascendc.cmake (the ``ascendc_library`` function); older releases used
# compiler/ instead of tools/.
ASCENDC_CMAKE_SUBDIRS = (
    "tools/tikcpp/ascendc_kernel_cmake",
    "compiler/tikcpp/ascendc_kernel_cmake",
)
FLAG = "PANGU_FASTKD_WITH_ASCEND"


class AscendBuildError(RuntimeError):
    """PANGU_FASTKD_WITH_ASCEND=1 was asked for, but the build cannot include the kernels."""


@dataclass(frozen=True)
class AscendBuildPlan:
    """Whether to build the Ascend kernels, with what, or why not.

    Attributes:
        enabled: build the kernels.
        reason: why they are skipped ("" when enabled).
        cann_path: the CANN toolkit root, when found.
        ascendc_cmake_dir: the directory holding ``ascendc.cmake``, when found.
        soc_version: the target chip (``SOC_VERSION``).
        torch_npu: whether torch_npu is installed.
    """

    enabled: bool
    reason: str
    cann_path: str | None
    ascendc_cmake_dir: str | None
    soc_version: str
    torch_npu: bool

    def skip_message(self) -> str:
        """The one line setup.py prints when the kernels are skipped."""
        return f"pangu_fastkd: Ascend C kernels skipped ({self.reason})"


def find_cann(env: Mapping[str, str]) -> tuple[str, str] | None:
    """The first CANN root (and its ascendc_kernel_cmake dir) among the env vars and the default.

    ASCEND_CANN_PACKAGE_PATH wins over ASCEND_HOME_PATH, which wins over the default install path;
    a root counts only when it contains ascendc_kernel_cmake.
    """
    candidates = [env.get("ASCEND_CANN_PACKAGE_PATH"), env.get("ASCEND_HOME_PATH")]
    candidates.append(DEFAULT_CANN_PATH)
    for root in candidates:
        if not root:
            continue
        for sub in ASCENDC_CMAKE_SUBDIRS:
            cmake_dir = os.path.join(root, sub)
            if os.path.isfile(os.path.join(cmake_dir, "ascendc.cmake")):
                return os.path.abspath(root), os.path.abspath(cmake_dir)
    return None


def torch_npu_installed() -> bool:
    """torch_npu is importable (looked up, not imported: importing it initialises the NPU)."""
    return importlib.util.find_spec("torch_npu") is not None


def plan_ascend_build(
    env: Mapping[str, str] | None = None,
    *,
    has_torch_npu: Callable[[], bool] = torch_npu_installed,
    kernel_dir: str | None = None,
) -> AscendBuildPlan:
    """Read the environment and decide whether this build includes the Ascend C kernels.

    Args:
        env: the environment (default ``os.environ``).
        has_torch_npu: how to tell whether torch_npu is installed (tests replace it).
        kernel_dir: the directory of the kernel sources (``csrc/ascend``); when given and it
            holds no ``*.cpp``, there is nothing to build, which is a skip even with
            PANGU_FASTKD_WITH_ASCEND=1 (as in cmake/ascend.cmake).

    Returns:
        The plan; ``enabled`` is False with a ``reason`` when the kernels are skipped.

    Raises:
        ValueError: PANGU_FASTKD_WITH_ASCEND is not 0/1, or SOC_VERSION is not a known chip.
        AscendBuildError: PANGU_FASTKD_WITH_ASCEND=1 but CANN or torch_npu is missing.
    """
    env = os.environ if env is None else env
    flag = env.get(FLAG, "").strip()
    if flag not in ("", "0", "1"):
        raise ValueError(f"{FLAG} must be 0, 1 or unset, got {flag!r}")
    soc = env.get("SOC_VERSION", "").strip() or DEFAULT_SOC_VERSION
    cann = find_cann(env)
    npu = has_torch_npu()

    def skipped(reason: str) -> AscendBuildPlan:
        return AscendBuildPlan(False, reason, *(cann or (None, None)), soc, npu)

    if flag == "0":
        return skipped(f"{FLAG}=0")
    if cann is None:
        reason = "no CANN toolkit found: set ASCEND_HOME_PATH"
    elif not npu:
        reason = "torch_npu is not installed"
    else:
        reason = ""
    if reason:
        if flag == "1":
            raise AscendBuildError(
                f"{FLAG}=1 but the Ascend C kernels cannot be built: {reason} "
                "(source <CANN>/set_env.sh and pip install torch_npu first)"
            )
        return skipped(reason)
    if soc not in KNOWN_SOC_VERSIONS:
        raise ValueError(
            f"SOC_VERSION={soc!r} is not a chip these kernels target; expected one of "
            f"{', '.join(KNOWN_SOC_VERSIONS)}"
        )
    if kernel_dir is not None and not glob.glob(os.path.join(kernel_dir, "*.cpp")):
        return skipped(f"no kernel sources in {kernel_dir}/*.cpp yet")
    return AscendBuildPlan(True, "", cann[0], cann[1], soc, npu)
