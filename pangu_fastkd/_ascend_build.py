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
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
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
# Where a failed optional build leaves its reason, next to the CMake build directories under
# build/: build_info() reports it instead of "rebuild", since rebuilding would fail the same way.
SKIP_RECORD = "ascend_skipped.txt"


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
        required: PANGU_FASTKD_WITH_ASCEND=1, so a failed build fails the install.
    """

    enabled: bool
    reason: str
    cann_path: str | None
    ascendc_cmake_dir: str | None
    soc_version: str
    torch_npu: bool
    required: bool = False

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
    return AscendBuildPlan(True, "", cann[0], cann[1], soc, npu, required=flag == "1")


# ---------------------------------------------------------------------------------------------
# Running the build (setup.py's build_ext)


def first_error(log: str) -> str | None:
    """The first error line of a CMake or compiler log, in one line, or None.

    CMake puts the message of ``message(FATAL_ERROR ...)`` on the indented lines after
    "CMake Error at <file>:<line> (message):", so those are joined to it.
    """
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("CMake Error"):
            detail = []
            for follow in lines[i + 1 :]:
                if follow.strip() and not follow.startswith(" "):
                    break
                if follow.strip():
                    detail.append(follow.strip())
            return " ".join([line.strip(), *detail])
        if re.search(r"\berror\b", line, re.IGNORECASE) and not line.startswith(
            ("-- ", "make", "gmake")
        ):
            return line.strip()
    return None


def build_ascend(
    plan: AscendBuildPlan,
    steps: Sequence[tuple[str, Sequence[str]]],
    log_path: str,
    *,
    echo: Callable[[str], None] = print,
) -> bool:
    """Run the CMake ``steps`` (name, command) of the Ascend build in order, output to ``log_path``.

    An optional build (PANGU_FASTKD_WITH_ASCEND unset) that fails is skipped: ``echo`` gets one
    line saying why and where the log is, the reason is recorded next to the log (SKIP_RECORD) for
    build_info(), and False is returned so that the install carries on with the CPU build. A
    required one (PANGU_FASTKD_WITH_ASCEND=1) streams the output to stdout as well and raises.

    Returns:
        True when every step succeeded (and any recorded skip was cleared).

    Raises:
        AscendBuildError: a step failed and ``plan.required``.
    """
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    record = os.path.join(os.path.dirname(os.path.abspath(log_path)), SKIP_RECORD)
    with open(log_path, "w") as log:
        for name, command in steps:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            try:
                process = subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
            except OSError as exc:  # cmake itself is missing
                log.write(f"{exc}\n")
                cause = f"{name} could not run: {exc}"
            else:
                assert process.stdout is not None
                lines = []
                for line in process.stdout:
                    lines.append(line)
                    log.write(line)
                    if plan.required:
                        sys.stdout.write(line)
                status = process.wait()
                if status == 0:
                    continue
                cause = first_error("".join(lines)) or f"{name} exited with status {status}"
            reason = f"the Ascend build failed: {cause}; log: {log_path}"
            if plan.required:
                raise AscendBuildError(f"{FLAG}=1 but {reason}")
            with open(record, "w") as out:
                out.write(reason + "\n")
            echo(f"pangu_fastkd: Ascend C kernels skipped ({reason})")
            return False
    clear_recorded_skip(os.path.dirname(os.path.abspath(log_path)))
    return True


def recorded_skip(build_root: str) -> str | None:
    """The reason the last optional Ascend build under ``build_root`` failed, if it did."""
    try:
        with open(os.path.join(build_root, SKIP_RECORD)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def clear_recorded_skip(build_root: str) -> None:
    """Forget a failed build's reason: the next build decided afresh."""
    try:
        os.remove(os.path.join(build_root, SKIP_RECORD))
    except FileNotFoundError:
        pass
