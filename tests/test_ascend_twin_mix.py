"""The twin's core model (tests/ascend_twin/include/README.md, "Cores, blocks and the data cache").

Runs tests/ascend_twin/core_model.cpp:
- on a 910B MIX kernel each block is one cube core and two vector cores; GetBlockIdx on a vector
  core is block * 2 + sub-block and GetBlockNum is blockDim, so rows split by GetBlockNum() alone
  overlap; GetBlockNum() * GetTaskRation() covers each row once. AIV-only kernels and the 310B
  have one core per block (GetTaskRation() == 1), as CANN's dav_c220/dav_m300 headers say;
- GlobalTensor::SetValue goes through each core's data cache, written back per 64-byte line:
  neighbouring values of different blocks in one line clobber each other; DataCopyPad (MTE3)
  and values 64 bytes apart do not.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from twin_build import compile_program, needs_gxx

pytestmark = needs_gxx


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_program("core_model", tmp_path_factory.mktemp("core_model"))


def _run(binary: Path, *args: object) -> list[str]:
    result = subprocess.run(
        [str(binary), *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def _split(binary: Path, stride: str, kind: str, chip: str, rows: int = 10, block_dim: int = 2):
    lines = _run(binary, "split", stride, kind, rows, block_dim, chip)
    hits = [int(h) for h in lines[0].split()[1:]]
    # core <kind> GetBlockIdx GetBlockNum GetTaskRation GetSubBlockIdx
    cores = sorted(tuple(int(v) for v in line.split()[2:]) for line in lines[1:])
    return hits, cores


def test_mix_kernel_has_two_vector_cores_per_block(binary: Path) -> None:
    hits, cores = _split(binary, "ration", "mix", "910b")
    assert cores == [(0, 2, 2, 0), (1, 2, 2, 1), (2, 2, 2, 0), (3, 2, 2, 1)]
    assert hits == [1] * 10


def test_splitting_by_block_num_alone_overlaps_on_a_mix_kernel(binary: Path) -> None:
    hits, _ = _split(binary, "blocknum", "mix", "910b")
    assert hits != [1] * 10  # vector cores 2 and 3 redo the rows of cores 0 and 1


@pytest.mark.parametrize(("kind", "chip"), [("aiv", "910b"), ("mix", "310b")])
def test_one_core_per_block_without_separated_mix(binary: Path, kind: str, chip: str) -> None:
    hits, cores = _split(binary, "blocknum", kind, chip)
    assert cores == [(0, 2, 1, 0), (1, 2, 1, 0)]
    assert hits == [1] * 10


def test_setvalue_neighbours_clobber_each_other_through_the_data_cache(binary: Path) -> None:
    values = [float(v) for v in _run(binary, "dcache", "setvalue", 4)[0].split()[1:]]
    # Lines are written back in block order: the last block's stale copy of the line wins.
    assert values == [0.0, 0.0, 0.0, 4.0]


@pytest.mark.parametrize("write", ["datacopypad", "separate-lines"])
def test_datacopypad_or_separate_lines_keep_every_value(binary: Path, write: str) -> None:
    values = [float(v) for v in _run(binary, "dcache", write, 4)[0].split()[1:]]
    assert values == [1.0, 2.0, 3.0, 4.0]
