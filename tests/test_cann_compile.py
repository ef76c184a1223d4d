"""The Ascend C code compiled against real headers: CANN's, and torch_npu's.

Kernels (csrc/ascend/*.cpp) x chip x dtype, and the host code (csrc/ascend/host/*.cpp), are
compiled with ``g++ -fsyntax-only`` against each CANN header tree named in
``PANGU_FASTKD_CANN_TREES`` (':'-separated roots; see scripts/check_cann_compile.py for the
layouts it understands and the overlay it builds). Without that variable those tests skip.

The host code is also compiled in every run against the real torch_npu headers (the torch-npu
wheel's ``torch_npu/include``, which ``scripts/setup.sh --dev`` extracts into
build/torch_npu_headers) and torch's, with generated ``aclrtlaunch_<kernel>.h`` launchers. With no
CANN tree at hand, the host Matmul tiling API comes from the CPU twin instead:
tests/ascend_twin/include's ``tiling/tiling_api.h`` and ``tiling/platform/platform_ascendc.h``
(and the ``kernel_tiling.h`` and ``twin_chips.h`` they include), nothing else of the twin.

All compiles of a session run up front on every core (one fixture), each test reads its row.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "check_cann_compile", REPO / "scripts" / "check_cann_compile.py"
)
ccc = importlib.util.module_from_spec(_spec)
sys.modules["check_cann_compile"] = ccc  # dataclasses look their module up by name
_spec.loader.exec_module(ccc)

GIVEN = ccc.trees_from_env()
# asc-tools and metadef checkouts only lend headers to an asc-devkit tree: no rows of their own.
ROOTS = [r for r in GIVEN if ccc.detect_layout(r.resolve())[0] in ("cann-install", "asc-devkit")]
NO_TREE = (
    f"no CANN header tree: set {ccc.TREES_ENV} to one or more ':'-separated roots (a CANN "
    "install or an asc-devkit checkout, with asc-tools and metadef checkouts for the devkit) to "
    "compile the Ascend C code against CANN's headers"
)
KERNEL_CASES = [
    (i, f.name, chip, dtype)
    for i in range(len(ROOTS))
    for f in ccc.kernel_files()
    for chip in ccc.CHIPS
    for dtype in ccc.DTYPES
]
HOST_CASES = [(i, f.name) for i in range(len(ROOTS)) for f in ccc.host_files()]
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")


def _case_id(case: tuple) -> str:
    return "-".join([Path(ROOTS[case[0]]).name or str(ROOTS[case[0]]), *map(str, case[1:])])


def _assert_compiled(row) -> None:
    assert row.ok, "\n".join(
        [f"{row.file} ({row.tree}, {row.chip}, {row.dtype}) does not compile:", *row.errors,
         "command: " + " ".join(row.command)]
    )  # fmt: skip


@pytest.fixture(scope="session")
def cann_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple, object]:
    """Every row against every tree, keyed like KERNEL_CASES and HOST_CASES."""
    work = tmp_path_factory.mktemp("cann_compile")
    trees = ccc.prepare_trees(GIVEN, work)
    index = {str(root): i for i, root in enumerate(ROOTS)}
    ordered = sorted(trees, key=lambda t: index[str(t.root)])  # back in ROOTS order
    for tree in ordered:
        ccc.probe_tree(tree, work / f"probe_{tree.name}")
    jobs = ccc.kernel_jobs(ordered)
    npu = ccc.torch_npu_include()
    if npu is not None:
        jobs += ccc.host_jobs(ordered, work, npu)
    rows: dict[tuple, object] = {}
    for job, row in zip(jobs, ccc.run_jobs(jobs), strict=True):
        i = index[str(job.tree.root)]
        key = (i, job.file.name, job.chip, job.dtype) if job.dtype != "-" else (i, job.file.name)
        rows[key] = row
    return rows


@needs_gxx
@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=_case_id(c)) for c in KERNEL_CASES + HOST_CASES]
    or [pytest.param(None, id="no-tree", marks=pytest.mark.skip(reason=NO_TREE))],
)
def test_compiles_against_cann(case, cann_rows) -> None:
    """A kernel (file, chip, dtype) or host file (file) against one CANN header tree."""
    if len(case) == 2 and ccc.torch_npu_include() is None:
        pytest.skip("no torch_npu headers: run scripts/setup.sh --dev")
    _assert_compiled(cann_rows[case])


@pytest.fixture(scope="session")
def twin_tiling_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    npu = ccc.torch_npu_include()
    if npu is None:
        pytest.skip("no torch_npu headers: run scripts/setup.sh --dev (build/torch_npu_headers)")
    work = tmp_path_factory.mktemp("host_twin_tiling")
    jobs = ccc.host_jobs([], work, npu, twin=True)
    return {job.file.name: row for job, row in zip(jobs, ccc.run_jobs(jobs), strict=True)}


@needs_gxx
@pytest.mark.parametrize("name", [f.name for f in ccc.host_files()])
def test_host_compiles_against_torch_npu(name: str, twin_tiling_rows) -> None:
    """The host code against the real torch_npu and torch headers (tiling API: the twin's)."""
    _assert_compiled(twin_tiling_rows[name])


def test_launchers_match_cann_generator(tmp_path: Path) -> None:
    """One generated launcher per entry point, in the form ascendc_library writes."""
    names = {n for f in ccc.kernel_files() for n, _ in ccc.kernel_entries(f)}
    assert {f"{stem}_{d}" for stem in ("sparse_kd_epilogue", "packed_attention_fwd")
            for d in ccc.DTYPES} <= names  # fmt: skip
    ccc.write_launchers(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(f"aclrtlaunch_{n}.h" for n in names)
    text = ccc.launcher_header("matmul_custom", ["a", "b", "workspace", "tilingGm"])
    assert text == (
        "#ifndef HEADER_ACLRTLAUNCH_MATMUL_CUSTOM_H\n#define HEADER_ACLRTLAUNCH_MATMUL_CUSTOM_H\n"
        '#include "acl/acl_base.h"\n\n#ifndef ACLRT_LAUNCH_KERNEL\n'
        "#define ACLRT_LAUNCH_KERNEL(kernel_func) aclrtlaunch_##kernel_func\n#endif\n\n"
        'extern "C" uint32_t aclrtlaunch_matmul_custom(uint32_t blockDim, aclrtStream stream, '
        "void* a, void* b, void* workspace, void* tilingGm);\n#endif\n"
    )


def test_intrinsic_shim_declares_exactly_the_call_the_tree_makes() -> None:
    line = (
        "<tree>/impl/basic_api/dav_m300/kernel_operator_dump_tensor_impl.h:100:25: error: no "
        "matching function for call to ‘copy_matrix_cc_to_gm(float*, float*, int, uint16_t&, "
        "uint16_t&, uint64_t, bool)’"
    )
    match = ccc._NO_MATCH_RE.search(line)
    assert match is not None
    assert ccc.shim_declaration(match) == (
        "void copy_matrix_cc_to_gm(float*, float*, int, uint16_t, uint16_t, uint64_t, bool);"
    )
    ascii_quotes = line.replace("‘", "'").replace("’", "'")
    assert ccc.shim_declaration(ccc._NO_MATCH_RE.search(ascii_quotes)) == ccc.shim_declaration(
        match
    )
    assert ccc._NO_MATCH_RE.search("x.h:1:2: error: 'foo' was not declared in this scope") is None
