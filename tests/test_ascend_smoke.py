"""The NPU first-run kit (pangu_fastkd/ascend_smoke/), run on the CPU twin of the host code.

The kit's NPU backend calls ``torch.ops.pangu_fastkd.*`` on NPU tensors; here ``TwinBackend``
sends the same calls to the twin host module (tests/ascend_host_build.py), so the whole grid,
the tolerance rule, the table, the JSON and the exit status run as they would on a board. A
broken backend shows that a wrong gradient, a NaN and a raising kernel each make FAIL rows
rather than a crash. Not covered: ``NpuBackend`` itself past its "cannot run here" checks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from ascend_host_build import SOC_910B, host_twin, needs_host_twin

from pangu_fastkd.ascend_smoke.cases import DTYPES, attention_cases, sparse_kd_cases
from pangu_fastkd.ascend_smoke.cli import main
from pangu_fastkd.ascend_smoke.environment import cann_version
from pangu_fastkd.ascend_smoke.errors import BackendUnavailableError
from pangu_fastkd.ascend_smoke.op_backends import NpuBackend, TwinBackend
from pangu_fastkd.ascend_smoke.report import markdown_table
from pangu_fastkd.ascend_smoke.runner import run_grid
from pangu_fastkd.ops import packed_attention_reference

REPO = Path(__file__).resolve().parents[1]
# Where torch_npu is installed the kit runs for real, and these "cannot run" checks do not apply.
no_torch_npu = pytest.mark.skipif(
    importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed"
)


def needs_twin(test: Callable[..., None]) -> Callable[..., None]:
    """The host tests' skip markers (``needs_host_twin``, a list) on one test."""
    for mark in needs_host_twin:
        test = mark(test)
    return test


@pytest.fixture(scope="session")
def twin(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return host_twin(SOC_910B, tmp_path_factory)


def _expected_rows(quick: bool = True) -> list[tuple[str, str, str]]:
    rows = [
        ("sparse_kd_fused", case.name, dtype) for case in sparse_kd_cases(quick) for dtype in DTYPES
    ]
    for case in attention_cases(quick):
        for dtype in DTYPES:
            rows += [
                ("packed_attention fwd", case.name, dtype),
                ("packed_attention fwd+bwd", case.name, dtype),
            ]
    return rows


def _run_quick(
    backend: TwinBackend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, dict[str, Any]]:
    """``--quick --no-timing --json`` on ``backend``: exit status, stdout, the JSON record."""
    out_json = tmp_path / "smoke.json"
    status = main(["--quick", "--no-timing", "--json", str(out_json)], backend=backend)
    stdout = capsys.readouterr().out
    return status, stdout, json.loads(out_json.read_text())


def test_quick_grid_covers_what_the_issue_asks() -> None:
    sparse = sparse_kd_cases(quick=True)
    assert any(c.vocab % 2 == 1 for c in sparse)
    assert any(c.missing_mass == "tail" and c.include_label and c.target for c in sparse)
    assert any(c.missing_mass == "renorm" and c.divergence == "reverse_kl" for c in sparse)
    assert any(not c.target and c.kd_weight == 0 for c in sparse)
    attention = attention_cases(quick=True)
    assert any(1 in c.lengths for c in attention)
    assert any(c.hq > c.hkv for c in attention)
    assert {c.d for c in attention} == {64, 128}
    assert set(DTYPES) == {"fp32", "bf16", "fp16"}


# ---------------------------------------------------------------------------------------------
# The grid on the twin


@needs_twin
def test_quick_grid_passes_on_the_twin(
    twin: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, stdout, record = _run_quick(TwinBackend(twin), tmp_path, capsys)
    assert status == 0, stdout
    expected = _expected_rows()
    assert stdout.rstrip().endswith(f"PASS: all {len(expected)} rows passed")
    assert "- chip: CPU twin of Ascend910B1" in stdout
    assert "- cann_version: " in stdout
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(expected)  # the header and one line per row
    assert sum("| PASS |" in line for line in table) == len(expected)

    assert record["passed"] is True
    assert record["environment"]["backend"] == "twin"
    assert "build_info" in record["environment"]
    rows = record["rows"]
    assert [(r["op"], r["case"], r["dtype"]) for r in rows] == expected
    for r in rows:
        assert r["passed"] and r["note"] == "", r
        assert 0 <= r["error"] <= r["allowed"], r
        assert r["worst"] in r["outputs"]
        assert r["ours_ms"] is None  # --no-timing
    outputs = {r["op"]: set(r["outputs"]) for r in rows}
    assert outputs["packed_attention fwd"] == {"out", "lse"}
    assert outputs["packed_attention fwd+bwd"] == {"grad_q", "grad_k", "grad_v"}
    assert {"loss", "row_loss", "grad_hidden", "grad_weight"} <= outputs["sparse_kd_fused"]
    assert any("grad_bias" in r["outputs"] for r in rows if r["op"] == "sparse_kd_fused")


class _TwinWithFusion(TwinBackend):
    """The twin, with the reference standing in for ``npu_fusion_attention``."""

    def has_fusion_attention(self) -> bool:
        return True

    def fusion_attention(self, q, k, v, cu, scale):
        return packed_attention_reference(q, k, v, cu, softmax_scale=scale)[0]


@needs_twin
def test_timing_fills_ours_baseline_and_reference(twin: ModuleType) -> None:
    rows = run_grid(
        _TwinWithFusion(twin), quick=True, timing=True, reps=1, warmup=0, dtypes=("fp32",)
    )
    assert rows and all(r.passed for r in rows), [r for r in rows if not r.passed]
    for r in rows:
        assert r.ours_ms and r.ours_ms > 0 and r.baseline_ms and r.baseline_ms > 0, r
        assert r.speedup == pytest.approx(r.baseline_ms / r.ours_ms)
        if r.op == "sparse_kd_fused":
            assert (r.baseline, r.reference_ms) == ("reference", None)
        else:
            assert r.baseline == "npu_fusion_attention" and r.reference_ms, r
    line = next(s for s in markdown_table(rows).splitlines() if "fwd+bwd" in s)
    assert "npu_fusion_attention" in line and "x |" in line


# ---------------------------------------------------------------------------------------------
# What a failure looks like


class _BrokenTwin(TwinBackend):
    """A wrong grad_weight (fp32, bf16) or a NaN grad_hidden (fp16) from the loss; an attention
    forward that raises on fp16 and a backward that raises on bf16."""

    def sparse_kd_fused(self, *args: Any) -> tuple[torch.Tensor, ...]:
        loss, grad_hidden, grad_weight, grad_bias, stats = super().sparse_kd_fused(*args)
        if grad_hidden.dtype == torch.float16:
            grad_hidden = grad_hidden.clone()
            grad_hidden[3, 1] = float("nan")
        else:
            grad_weight = grad_weight.clone()
            grad_weight[7, 2] += 0.05 * grad_weight.abs().max()
        return loss, grad_hidden, grad_weight, grad_bias, stats

    def packed_attention_fwd(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if args[0].dtype == torch.float16:
            raise RuntimeError("EZ9999: vector core exception\nsecond line of the trace")
        return super().packed_attention_fwd(*args)

    def packed_attention_bwd(self, *args: Any) -> tuple[torch.Tensor, ...]:
        if args[1].dtype == torch.bfloat16:
            raise ValueError("aclrtSynchronizeStream failed: 507015")
        return super().packed_attention_bwd(*args)


@needs_twin
def test_a_broken_backend_makes_fail_rows_and_a_nonzero_status(
    twin: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The record is strict JSON: the NaN error is a string.
    status, stdout, record = _run_quick(_BrokenTwin(twin), tmp_path, capsys)
    assert status == 1
    assert record["passed"] is False
    rows = {(r["op"], r["case"], r["dtype"]): r for r in record["rows"]}
    assert list(rows) == _expected_rows()
    failed = 0
    for (op, _, dtype), r in rows.items():
        if op == "sparse_kd_fused":
            assert not r["passed"]
            assert r["worst"] == ("grad_hidden" if dtype == "fp16" else "grad_weight"), r
            assert (r["error"] == "nan") if dtype == "fp16" else (r["error"] > r["allowed"])
        elif dtype == "fp32" or (op == "packed_attention fwd" and dtype == "bf16"):
            assert r["passed"], r
        elif dtype == "bf16":
            assert r["note"] == "ValueError: aclrtSynchronizeStream failed: 507015", r
        elif op == "packed_attention fwd":
            assert r["note"] == "RuntimeError: EZ9999: vector core exception", r
        else:
            assert r["note"] == "forward failed: RuntimeError: EZ9999: vector core exception"
        failed += not r["passed"]
    assert failed == 9 + 6
    assert stdout.rstrip().endswith(f"FAIL: {failed} of {len(rows)} rows failed")
    assert "| **FAIL** |" in stdout and "second line of the trace" not in stdout


# ---------------------------------------------------------------------------------------------
# No NPU here


@no_torch_npu
def test_without_torch_npu_it_says_so_in_one_line() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "pangu_fastkd.ascend_smoke", "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("pangu_fastkd.ascend_smoke: cannot run: ")
    assert "torch_npu is not installed" in lines[0]


@no_torch_npu
def test_npu_backend_refuses_without_torch_npu() -> None:
    with pytest.raises(BackendUnavailableError, match="torch_npu is not installed"):
        NpuBackend("npu:0")


# ---------------------------------------------------------------------------------------------
# CANN version


def test_cann_version_from_the_toolkit_install_info(tmp_path: Path) -> None:
    root = tmp_path / "ascend-toolkit" / "latest"
    (root / "x86_64-linux").mkdir(parents=True)
    info = root / "x86_64-linux" / "ascend_toolkit_install.info"
    info.write_text("package_name=Ascend-cann-toolkit\nversion=8.0.RC3\ninnerversion=V100R001\n")
    missing = str(tmp_path / "nowhere")
    assert cann_version({"ASCEND_HOME_PATH": str(root)}, missing) == (
        "8.0.RC3",
        str(info),
    )
    # ASCEND_TOOLKIT_HOME is read when ASCEND_HOME_PATH points nowhere; so is the default root.
    env = {"ASCEND_HOME_PATH": missing, "ASCEND_TOOLKIT_HOME": str(root)}
    assert cann_version(env, missing)[0] == "8.0.RC3"
    assert cann_version({}, str(root))[0] == "8.0.RC3"
    # A top-level version.info wins over the per-arch file.
    (root / "version.info").write_text("Version=8.1.RC1\n")
    assert cann_version({}, str(root)) == ("8.1.RC1", str(root / "version.info"))


def test_cann_version_unknown_says_where_it_looked(tmp_path: Path) -> None:
    root = tmp_path / "cann"
    (root / "compiler").mkdir(parents=True)
    (root / "compiler" / "version.info").write_text("no version line here\n")
    missing = str(tmp_path / "nowhere")
    version, reason = cann_version({"ASCEND_HOME_PATH": str(root)}, missing)
    assert version == "unknown"
    assert str(root) in reason and f"{missing} (no such directory)" in reason
