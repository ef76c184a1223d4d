"""The NPU build path and dispatch, exercised as far as they go without CANN or an NPU.

Nothing here runs on Ascend hardware: the CANN tree is a fake directory with a stand-in
``ascendc.cmake``, ``torch_npu`` is a fake module injected into ``sys.modules``, and "npu" tensors
are CPU tensors whose device type the dispatch modules are told is ``npu``. What is checked is
our side of each boundary: which path is chosen, and with which arguments.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from pangu_fastkd import _ascend_build, _native
from pangu_fastkd.data.boundaries import cu_seqlens_from_lengths
from pangu_fastkd.ops import (
    TopKTarget,
    fused_linear_sparse_kd,
    packed_attention,
    packed_attention_reference,
)

REPO = Path(__file__).resolve().parents[1]
attention_mod = importlib.import_module("pangu_fastkd.ops.packed_attention")
sparse_kd_mod = importlib.import_module("pangu_fastkd.ops.sparse_kd")
needs_native = pytest.mark.skipif(not _native.native_available(), reason="C++ extension not built")


# ---------------------------------------------------------------------------------------------
# Detection (pangu_fastkd/_ascend_build.py, used by setup.py and build_info)


def fake_cann(root: Path, sub: str = "tools", *, broken: bool = False) -> Path:
    """A directory that looks like a CANN toolkit to the detection (and to CMake).

    Its ascendc.cmake records the calls instead of compiling kernels; a ``broken`` one fails
    when included, as a CANN whose compiler cannot run does.
    """
    cmake_dir = root / sub / "tikcpp" / "ascendc_kernel_cmake"
    cmake_dir.mkdir(parents=True)
    (cmake_dir / "ascendc.cmake").write_text(
        "# Stand-in for CANN's ascendc.cmake: records the calls instead of compiling kernels.\n"
        + ('message(FATAL_ERROR "fake ascendc.cmake: bisheng not found")\n' if broken else "")
        + "function(ascendc_library name kind)\n"
        '  message(STATUS "fake ascendc_library ${name} ${kind} ${ARGN}")\n'
        "  add_library(${name} INTERFACE)\n"
        "endfunction()\n"
        "function(ascendc_include_directories name)\n"
        '  message(STATUS "fake ascendc_include_directories ${name} ${ARGN}")\n'
        "endfunction()\n"
        "function(ascendc_compile_definitions name)\n"
        '  message(STATUS "fake ascendc_compile_definitions ${name} ${ARGN}")\n'
        "endfunction()\n"
    )
    return root


def kernel_dir(root: Path, *kernels: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in kernels:
        (root / name).write_text("// kernel source placeholder for configure-only tests\n")
    return root


@pytest.fixture
def no_default_cann(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The machine running the tests must not leak a real install into the "no CANN" cases.
    monkeypatch.setattr(_ascend_build, "DEFAULT_CANN_PATH", str(tmp_path / "no-such-cann"))


def plan(env: dict[str, str], *, npu: bool = True, kernels: Path | None = None):
    return _ascend_build.plan_ascend_build(env, has_torch_npu=lambda: npu, kernel_dir=kernels)


def test_skipped_without_cann_prints_one_clear_line(no_default_cann: None) -> None:
    result = plan({})
    assert not result.enabled and result.cann_path is None
    assert result.skip_message() == (
        "pangu_fastkd: Ascend C kernels skipped (no CANN toolkit found: set ASCEND_HOME_PATH)"
    )


def test_forced_build_without_cann_or_torch_npu_is_an_error(
    no_default_cann: None, tmp_path: Path
) -> None:
    with pytest.raises(_ascend_build.AscendBuildError, match=r"no CANN toolkit.*ASCEND_HOME_PATH"):
        plan({"PANGU_FASTKD_WITH_ASCEND": "1"})
    cann = fake_cann(tmp_path / "cann")
    env = {"PANGU_FASTKD_WITH_ASCEND": "1", "ASCEND_HOME_PATH": str(cann)}
    with pytest.raises(_ascend_build.AscendBuildError, match="torch_npu is not installed"):
        plan(env, npu=False)


@pytest.mark.parametrize("sub", ["tools", "compiler"])
def test_found_cann_enables_the_build(no_default_cann: None, tmp_path: Path, sub: str) -> None:
    cann = fake_cann(tmp_path / "cann", sub)
    kernels = kernel_dir(tmp_path / "kernels", "sparse_kd.cpp")
    result = plan({"ASCEND_HOME_PATH": str(cann), "SOC_VERSION": "Ascend310B4"}, kernels=kernels)
    assert result.enabled and result.reason == ""
    assert result.cann_path == str(cann)
    assert result.ascendc_cmake_dir == str(cann / sub / "tikcpp" / "ascendc_kernel_cmake")
    assert result.soc_version == "Ascend310B4"


def test_package_path_wins_over_home_path(no_default_cann: None, tmp_path: Path) -> None:
    home, package = fake_cann(tmp_path / "home"), fake_cann(tmp_path / "package")
    env = {"ASCEND_HOME_PATH": str(home), "ASCEND_CANN_PACKAGE_PATH": str(package)}
    assert plan(env).cann_path == str(package)
    # A root without ascendc_kernel_cmake does not count: the next candidate is used.
    env["ASCEND_CANN_PACKAGE_PATH"] = str(tmp_path)
    assert plan(env).cann_path == str(home)


def test_skip_reasons(no_default_cann: None, tmp_path: Path) -> None:
    cann = str(fake_cann(tmp_path / "cann"))
    assert plan({"ASCEND_HOME_PATH": cann}).soc_version == "Ascend910B1"
    off = plan({"ASCEND_HOME_PATH": cann, "PANGU_FASTKD_WITH_ASCEND": "0"})
    assert not off.enabled and off.reason == "PANGU_FASTKD_WITH_ASCEND=0"
    assert plan({"ASCEND_HOME_PATH": cann}, npu=False).reason == "torch_npu is not installed"
    empty = plan({"ASCEND_HOME_PATH": cann, "PANGU_FASTKD_WITH_ASCEND": "1"}, kernels=tmp_path)
    assert not empty.enabled and "no kernel sources" in empty.reason


def test_bad_switches_are_refused(no_default_cann: None, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PANGU_FASTKD_WITH_ASCEND must be 0, 1 or unset"):
        plan({"PANGU_FASTKD_WITH_ASCEND": "yes"})
    cann = str(fake_cann(tmp_path / "cann"))
    with pytest.raises(ValueError, match=r"SOC_VERSION='Ascend910A'.*Ascend910B1"):
        plan({"ASCEND_HOME_PATH": cann, "SOC_VERSION": "Ascend910A"})


def test_build_info_says_why_there_are_no_ascend_kernels() -> None:
    info = _native.build_info()
    assert info["ascend"] is False
    assert isinstance(info["ascend_skipped"], str) and info["ascend_skipped"]


# setup.py's build_ext with the C++ compile stubbed out: only its Ascend decision runs.
SETUP_PROBE = """
import runpy, sys, setuptools
from setuptools.dist import Distribution
from torch.utils.cpp_extension import BuildExtension
captured = {}
setuptools.setup = lambda **kw: captured.update(kw)
BuildExtension.run = lambda self: None
runpy.run_path(sys.argv[1], run_name="__main__")
captured["cmdclass"]["build_ext"](Distribution()).run()
"""


def run_setup_build_ext(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    probe = tmp_path / "probe.py"
    probe.write_text(SETUP_PROBE)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ASCEND_", "PANGU_FASTKD_"))}
    return subprocess.run(
        [sys.executable, str(probe), str(REPO / "setup.py")],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=120,
    )


@pytest.mark.skipif(
    os.path.exists(_ascend_build.DEFAULT_CANN_PATH), reason="a real CANN is installed here"
)
def test_setup_prints_one_skip_line_or_fails_when_forced(tmp_path: Path) -> None:
    skipped = run_setup_build_ext(tmp_path, {})
    assert skipped.returncode == 0, skipped.stderr
    assert skipped.stdout.splitlines() == [
        "pangu_fastkd: Ascend C kernels skipped (no CANN toolkit found: set ASCEND_HOME_PATH)"
    ]
    forced = run_setup_build_ext(tmp_path, {"PANGU_FASTKD_WITH_ASCEND": "1"})
    assert forced.returncode != 0
    assert "AscendBuildError: PANGU_FASTKD_WITH_ASCEND=1" in forced.stderr


# ---------------------------------------------------------------------------------------------
# Running the Ascend build (_ascend_build.build_ascend, setup.py's build step): a real CMake
# configure of this repository against a CANN whose ascendc.cmake fails.


def failing_build(tmp_path: Path, env: dict[str, str]):
    """The plan, steps and log path setup.py would use, with a broken fake CANN."""
    cann = fake_cann(tmp_path / "cann", broken=True)
    torch_npu_dir = tmp_path / "torch_npu"
    (torch_npu_dir / "include").mkdir(parents=True)
    kernels = kernel_dir(tmp_path / "kernels", "sparse_kd_epilogue.cpp")
    build_plan = plan({"ASCEND_HOME_PATH": str(cann), **env}, kernels=kernels)
    build_dir = tmp_path / "build" / f"ascend-{build_plan.soc_version}"
    configure = [
        "cmake", "-S", str(REPO), "-B", str(build_dir),
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DPython3_EXECUTABLE={sys.executable}",
        "-DPANGU_FASTKD_WITH_ASCEND=ON",
        f"-DASCEND_CANN_PACKAGE_PATH={cann}",
        f"-DPANGU_FASTKD_ASCEND_KERNEL_DIR={kernels}",
        f"-DTORCH_NPU_PATH={torch_npu_dir}",
    ]  # fmt: skip
    steps = [("cmake configure", configure), ("cmake --build", ["cmake", "--build", "x"])]
    return build_plan, steps, f"{build_dir}.log", cann


def test_a_failed_optional_build_is_skipped_with_one_line(
    no_default_cann: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_plan, steps, log, cann = failing_build(tmp_path, {})
    assert build_plan.enabled and not build_plan.required
    printed: list[str] = []
    assert _ascend_build.build_ascend(build_plan, steps, log, echo=printed.append) is False
    ascendc = cann / "tools" / "tikcpp" / "ascendc_kernel_cmake" / "ascendc.cmake"
    reason = (
        f"the Ascend build failed: CMake Error at {ascendc}:2 (message): "
        f"fake ascendc.cmake: bisheng not found; log: {log}"
    )
    assert printed == [f"pangu_fastkd: Ascend C kernels skipped ({reason})"]
    # The whole CMake output is in the log; the build step never ran.
    text = Path(log).read_text()
    assert "CMake Error at" in text and "Configuring incomplete" in text
    assert "$ cmake --build" not in text
    # build_info() reports the failure, not "rebuild": rebuilding would fail the same way.
    assert _ascend_build.recorded_skip(str(tmp_path / "build")) == reason
    monkeypatch.setattr(_native, "_BUILD_ROOT", str(tmp_path / "build"))
    monkeypatch.setattr(_ascend_build, "plan_ascend_build", lambda **kw: build_plan)
    assert _native._load_ascend() == (None, reason)


def test_a_failed_forced_build_fails_the_install(no_default_cann: None, tmp_path: Path) -> None:
    build_plan, steps, log, _ = failing_build(tmp_path, {"PANGU_FASTKD_WITH_ASCEND": "1"})
    assert build_plan.required
    printed: list[str] = []
    with pytest.raises(
        _ascend_build.AscendBuildError,
        match=r"PANGU_FASTKD_WITH_ASCEND=1 but the Ascend build failed: CMake Error at .*"
        r"bisheng not found; log: ",
    ):
        _ascend_build.build_ascend(build_plan, steps, log, echo=printed.append)
    assert printed == [] and _ascend_build.recorded_skip(str(tmp_path / "build")) is None


def test_first_error_of_a_compile_log() -> None:
    log = (
        "-- Configuring done\n[1/3] Building CXX object x.o\nFAILED: x.o\n"
        "g++ -Werror -c x.cpp\nx.cpp:3:1: error: 'foo' was not declared\n"
        "gmake[2]: *** [x.o] Error 1\n"
    )
    assert _ascend_build.first_error(log) == "x.cpp:3:1: error: 'foo' was not declared"
    assert _ascend_build.first_error("-- all good\n") is None


# ---------------------------------------------------------------------------------------------
# CMake configure (cmake/ascend.cmake): configure only, no kernel is compiled.


def configure(tmp_path: Path, *options: str, env: dict[str, str] | None = None):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ASCEND_", "SOC_VERSION"))}
    command = [
        "cmake", "-S", str(REPO), "-B", str(tmp_path / "build"),
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DPython3_EXECUTABLE={sys.executable}",
        *options,
    ]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, env={**clean, **(env or {})}, timeout=120
    )


def test_cmake_without_the_option_says_skipped(tmp_path: Path) -> None:
    result = configure(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Ascend C kernels skipped (PANGU_FASTKD_WITH_ASCEND=OFF)" in result.stdout


@pytest.mark.skipif(
    os.path.exists(_ascend_build.DEFAULT_CANN_PATH), reason="a real CANN is installed here"
)
def test_cmake_with_the_option_but_no_cann_fails_clearly(tmp_path: Path) -> None:
    result = configure(tmp_path, "-DPANGU_FASTKD_WITH_ASCEND=ON")
    assert result.returncode != 0
    assert "no CANN toolkit found" in result.stderr and "ASCEND_HOME_PATH" in result.stderr


def test_cmake_with_cann_but_no_kernel_sources_skips(tmp_path: Path) -> None:
    cann = fake_cann(tmp_path / "cann")
    result = configure(
        tmp_path,
        "-DPANGU_FASTKD_WITH_ASCEND=ON",
        f"-DPANGU_FASTKD_ASCEND_KERNEL_DIR={kernel_dir(tmp_path / 'kernels')}",
        env={"ASCEND_HOME_PATH": str(cann)},
    )
    assert result.returncode == 0, result.stderr
    assert f"CANN at {cann}, SOC_VERSION=Ascend910B1" in result.stdout
    assert "Ascend C kernels skipped (no kernel sources" in result.stdout
    assert "fake ascendc_library" not in result.stdout


def test_cmake_with_cann_and_kernels_declares_the_library(tmp_path: Path) -> None:
    cann = fake_cann(tmp_path / "cann", "compiler")
    kernels = kernel_dir(
        tmp_path / "kernels", "sparse_kd.cpp", "softmax.cpp", "packed_attention_fwd.cpp"
    )
    torch_npu_dir = tmp_path / "torch_npu"
    (torch_npu_dir / "include").mkdir(parents=True)
    common = ["-DPANGU_FASTKD_WITH_ASCEND=ON", f"-DPANGU_FASTKD_ASCEND_KERNEL_DIR={kernels}"]
    missing_npu = configure(
        tmp_path / "a",
        *common,
        "-DTORCH_NPU_PATH=/no/torch_npu",
        env={"ASCEND_HOME_PATH": str(cann)},
    )
    assert missing_npu.returncode != 0 and "torch_npu was not found" in missing_npu.stderr

    result = configure(
        tmp_path / "b",
        *common,
        f"-DTORCH_NPU_PATH={torch_npu_dir}",
        "-DSOC_VERSION=Ascend310B1",
        env={"ASCEND_CANN_PACKAGE_PATH": str(cann)},
    )
    assert result.returncode == 0, result.stderr
    assert "SOC_VERSION=Ascend310B1" in result.stdout
    # Two libraries: the Matmul kernels with the definitions that make the generated wrapper set
    # up the system workspace REGIST_MATMUL_OBJ waits on, the vector kernels without.
    lines = result.stdout.replace(";", " ").splitlines()  # the fake prints ARGN as a list
    declared = {
        line.split()[3]: line.split()[4:] for line in lines if "fake ascendc_library" in line
    }
    assert declared == {
        "pangu_fastkd_ascend_matmul": ["STATIC", str(kernels / "packed_attention_fwd.cpp")],
        "pangu_fastkd_ascend_vector": [
            "STATIC",
            str(kernels / "softmax.cpp"),
            str(kernels / "sparse_kd.cpp"),
        ],
    }
    definitions = [line.split()[3:] for line in lines if "fake ascendc_compile_definitions" in line]
    assert definitions == [
        ["pangu_fastkd_ascend_matmul", "PRIVATE", "HAVE_WORKSPACE", "HAVE_TILING"]
    ]

    bad_soc = configure(tmp_path / "c", *common, "-DSOC_VERSION=Ascend310P3")
    assert bad_soc.returncode != 0 and "SOC_VERSION=Ascend310P3 is not a chip" in bad_soc.stderr


# ---------------------------------------------------------------------------------------------
# Dispatch


def pretend_device(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    for module in (attention_mod, sparse_kd_mod):
        monkeypatch.setattr(module, "_device_type", lambda t: device)


class FakeTorchNpu(types.ModuleType):
    """Records npu_fusion_attention calls and answers with the reference (not torch_npu's math)."""

    def __init__(self) -> None:
        super().__init__("torch_npu")
        self.calls: list[tuple[tuple, dict]] = []

    def npu_fusion_attention(self, q, k, v, head_num, input_layout, **options):
        self.calls.append(((q, k, v, head_num, input_layout), options))
        cu = torch.tensor([0, *options["actual_seq_qlen"]], dtype=torch.int32)
        out, lse = packed_attention_reference(
            q, k, v, cu, causal=options["sparse_mode"] == 3, softmax_scale=options["scale"]
        )
        # torch_npu returns softmax max and sum as [T, N, 8]; lse = max + log(sum).
        softmax_max = lse.transpose(0, 1).unsqueeze(-1).expand(-1, -1, 8) - 1.0
        softmax_sum = torch.full_like(softmax_max, torch.e)
        return out, softmax_max, softmax_sum, None, 0, 0, 0


@pytest.fixture
def fake_torch_npu(monkeypatch: pytest.MonkeyPatch) -> FakeTorchNpu:
    module = FakeTorchNpu()
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    return module


def attention_inputs(lengths=(3, 5, 1), hq=4, hkv=2, d=6):
    gen = torch.Generator().manual_seed(0)
    t = sum(lengths)
    q = torch.randn(t, hq, d, generator=gen)
    k, v = (torch.randn(t, hkv, d, generator=gen) for _ in range(2))
    return q, k, v, cu_seqlens_from_lengths(torch.tensor(lengths))


@needs_native
def test_cpu_tensors_go_to_the_cpu_kernels() -> None:
    q, k, v, _ = attention_inputs()
    assert attention_mod.attention_route(q, k, v) == "cpu_kernel"
    assert sparse_kd_mod.sparse_kd_route(q, k, v) == "cpu_kernel"


def test_other_devices_go_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_device(monkeypatch, "xpu")
    q, k, v, cu = attention_inputs()
    assert attention_mod.attention_route(q, k, v) == "reference"
    assert sparse_kd_mod.sparse_kd_route(q, k, v) == "reference"
    expected = packed_attention_reference(q, k, v, cu)[0]
    torch.testing.assert_close(packed_attention(q, k, v, cu), expected, rtol=0, atol=0)


def test_npu_without_kernel_or_torch_npu_goes_to_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    pretend_device(monkeypatch, "npu")
    q, k, v, _ = attention_inputs()
    assert attention_mod.attention_route(q, k, v) == "reference"
    assert sparse_kd_mod.sparse_kd_route(q, k, v) == "reference"


@pytest.mark.parametrize("causal", [True, False])
def test_npu_attention_falls_back_to_npu_fusion_attention_in_tnd_layout(
    monkeypatch: pytest.MonkeyPatch, fake_torch_npu: FakeTorchNpu, causal: bool
) -> None:
    pretend_device(monkeypatch, "npu")
    q, k, v, cu = attention_inputs()
    assert attention_mod.attention_route(q, k, v) == "npu_fusion_attention"
    out, lse = packed_attention(q, k, v, cu, causal=causal, softmax_scale=0.3, return_lse=True)

    ((args, options),) = fake_torch_npu.calls
    assert args[:3] == (q, k, v) and args[3] == 4 and args[4] == "TND"
    assert options["actual_seq_qlen"] == [3, 8, 9] == options["actual_seq_kvlen"]
    assert options["scale"] == pytest.approx(0.3)
    if causal:
        mask = options["atten_mask"]
        assert (
            options["sparse_mode"] == 3 and mask.shape == (2048, 2048) and mask.dtype == torch.bool
        )
        assert bool(mask[0, 1]) and not bool(mask[1, 0]) and not bool(mask[5, 5])
    else:
        assert options["sparse_mode"] == 0 and "atten_mask" not in options
    ref_out, ref_lse = packed_attention_reference(q, k, v, cu, causal=causal, softmax_scale=0.3)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)  # [T, Hq, 8] max/sum -> [Hq, T] lse


def test_npu_attention_with_a_window_is_not_sent_to_the_fallback(
    monkeypatch: pytest.MonkeyPatch, fake_torch_npu: FakeTorchNpu
) -> None:
    pretend_device(monkeypatch, "npu")
    q, k, v, cu = attention_inputs()
    assert attention_mod.attention_route(q, k, v, window=2) == "reference"
    packed_attention(q, k, v, cu, window=2)
    assert fake_torch_npu.calls == []


@needs_native
def test_npu_tensors_go_to_the_ascend_kernels_when_built(
    monkeypatch: pytest.MonkeyPatch, fake_torch_npu: FakeTorchNpu
) -> None:
    pretend_device(monkeypatch, "npu")
    for module in (attention_mod, sparse_kd_mod):
        monkeypatch.setattr(module, "npu_kernel_available", lambda op: True)
    q, k, v, _ = attention_inputs(d=16)
    assert attention_mod.attention_route(q, k, v) == "npu_kernel"
    assert attention_mod.attention_route(q.bfloat16(), k.bfloat16(), v.bfloat16()) == "npu_kernel"
    assert sparse_kd_mod.sparse_kd_route(q, k, v) == "npu_kernel"
    assert fake_torch_npu.calls == []


@needs_native
def test_npu_calls_the_ascend_kernels_do_not_cover_go_elsewhere(
    monkeypatch: pytest.MonkeyPatch, fake_torch_npu: FakeTorchNpu
) -> None:
    # The Ascend C attention is causal, windowless, fp32/bf16/fp16 with D % 16 == 0; the epilogue
    # takes fp32/bf16/fp16. Everything else must not reach the op (it would raise there).
    pretend_device(monkeypatch, "npu")
    for module in (attention_mod, sparse_kd_mod):
        monkeypatch.setattr(module, "npu_kernel_available", lambda op: True)
    q, k, v, _ = attention_inputs(d=16)
    route = attention_mod.attention_route
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert route(q.to(dtype), k.to(dtype), v.to(dtype)) == "npu_kernel", dtype
        assert sparse_kd_mod.sparse_kd_route(q.to(dtype), k.to(dtype), v) == "npu_kernel", dtype
    assert route(q, k, v, causal=False) == "npu_fusion_attention"
    assert route(q, k, v, window=4) == "reference"
    assert route(q.double(), k.double(), v.double()) == "npu_fusion_attention"
    q6, k6, v6, _ = attention_inputs(d=6)
    assert route(q6, k6, v6) == "npu_fusion_attention"
    assert route(q6.half(), k6.half(), v6.half()) == "npu_fusion_attention"
    assert sparse_kd_mod.sparse_kd_route(q.double(), k.double(), v) == "reference"


def test_no_npu_kernel_is_registered_in_this_build() -> None:
    assert not _native.npu_kernel_available("packed_attention_fwd")
    assert not _native.npu_kernel_available("sparse_kd_fused")


def test_npu_sparse_kd_without_kernel_uses_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_device(monkeypatch, "npu")
    used: list[bool] = []
    reference = sparse_kd_mod.sparse_kd_reference

    def spy(*args, **kwargs):
        used.append(True)
        return reference(*args, **kwargs)

    monkeypatch.setattr(sparse_kd_mod, "sparse_kd_reference", spy)
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(5, 3, generator=gen), torch.randn(11, 3, generator=gen)
    labels = torch.tensor([1, -100, 4, 10, 0])
    ids = torch.tensor([[1, 2], [3, -1], [4, 0], [10, 9], [0, 5]], dtype=torch.int32)
    logits = torch.randn(5, 2, generator=gen)
    target = TopKTarget(ids, logits, torch.logsumexp(logits, 1) + 1.0, logits[:, 0], 1.0)
    loss = fused_linear_sparse_kd(hidden, weight, labels, target, kd_weight=0.5)
    assert used == [True] and torch.isfinite(loss)
