"""The NPU host code launches on the right stream: flushed, and of the inputs' device.

torch_npu queues ATen ops on a task queue that a worker thread submits to the stream, so a kernel
launched on ``getCurrentNPUStream().stream(false)`` can overtake the ops queued before it (the
logits GEMM, the tiling copy); and ``getCurrentNPUStream()`` is the *current* device's stream, the
inputs' one only under a device guard. On CPU both mistakes would go unnoticed, so the host twin
(tests/ascend_twin/host/twin_npu_runtime.h) keeps the state they depend on: the ATen ops run since
the last ``stream(true)`` (counted by a RecordFunction callback) and the thread's current device
(set by the twin ``c10_npu::NPUGuard``). Its launchers refuse a launch with queued ops or on a
device other than the tensors' (device 0).

The reference module must launch cleanly with another device current; a variant built with the
two bugs put back (``stream(false)`` in npu_launch.h, no device guard in the three entries) must
be refused with the twin's messages, which shows that the checks see them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType

import pytest
import torch
from ascend_host_build import SOC_910B, host_twin, host_twin_variant, needs_host_twin

from pangu_fastkd.data.boundaries import cu_seqlens_from_lengths
from pangu_fastkd.ops.sparse_kd import sparse_kd_op_args

pytestmark = needs_host_twin

UNFLUSHED = (
    r"launch on a stream whose torch_npu task queue was not flushed \(\d+ ATen ops ran since the "
    r"last flush\): take the stream with stream\(true\) right before the launch"
)
WRONG_DEVICE = (
    r"launch on the stream of device 1, but the kernel's tensors are on device 0: hold a "
    r"c10_npu::NPUGuard"
)

# The two bugs, as the sources had them before the fix: the stream taken without flushing the
# task queue, and no device guard.
BUGS_PUT_BACK = {
    "csrc/ascend/host/npu_launch.h": [
        (".stream(/*need_empty=*/true)", ".stream(/*need_empty=*/false)"),
    ],
    "csrc/ascend/host/sparse_kd_npu.cpp": [("const c10_npu::NPUGuard device_guard(device);", "")],
    "csrc/ascend/host/packed_attention_npu.cpp": [
        ("const c10_npu::NPUGuard device_guard(guarded_device(q));", "(void)guarded_device(q);"),
    ],
}


@pytest.fixture(scope="session")
def twin(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return host_twin(SOC_910B, tmp_path_factory)


@pytest.fixture(scope="session")
def buggy_twin(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return host_twin_variant("stream_bugs", SOC_910B, BUGS_PUT_BACK, tmp_path_factory)


@pytest.fixture
def current_device() -> Iterator[Callable[[ModuleType, int], None]]:
    """Makes a device current in a twin module for one test, as torch.npu.set_device would."""
    touched: list[ModuleType] = []

    def set_device(module: ModuleType, device: int) -> None:
        touched.append(module)
        module.twin_set_device(device)

    yield set_device
    for module in touched:
        module.twin_set_device(0)


# ---------------------------------------------------------------------------------------------
# One call of each host entry, with the CPU kernel's result to compare against


def _sparse_kd_args() -> list:
    """Cross-entropy over 11 rows in chunks of 4: the chunk loop interleaves ATen GEMMs and
    epilogue launches, so every launch after the first follows freshly queued ATen work."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(11, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 40, (11,), generator=g)
    labels[3] = -100
    return sparse_kd_op_args(
        hidden, weight, labels, None, kd_weight=0.0, include_label=False, chunk_rows=4
    )


def _attention_args() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(12, 2, 16, generator=g) for _ in range(3))
    return q, k, v, cu_seqlens_from_lengths((5, 7))


def _calls(module: ModuleType) -> dict[str, Callable[[], tuple[torch.Tensor, ...]]]:
    """Each host entry's call on ``module`` (a twin module or ``torch.ops.pangu_fastkd``, whose
    schemas take the same arguments); the backward takes the CPU kernel's forward."""
    q, k, v, cu = _attention_args()
    out, lse = torch.ops.pangu_fastkd.packed_attention_fwd(q, k, v, cu, 0.25, True, -1)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    return {
        "sparse_kd_fused": lambda: module.sparse_kd_fused(*_sparse_kd_args()),
        "packed_attention_fwd": lambda: module.packed_attention_fwd(q, k, v, cu, 0.25, True, -1),
        "packed_attention_bwd": lambda: module.packed_attention_bwd(
            grad_out, q, k, v, out, lse, cu, 0.25, True, -1
        ),
    }


ENTRIES = ("sparse_kd_fused", "packed_attention_fwd", "packed_attention_bwd")


@pytest.mark.parametrize("device", [0, 1])
@pytest.mark.parametrize("entry", ENTRIES)
def test_launches_run_with_any_device_current(
    twin: ModuleType, current_device: Callable, entry: str, device: int
) -> None:
    # Device 1 current plays a process that set another NPU than the inputs' one: the entry's
    # guard must make the inputs' device current for its launches, and restore device 1 after.
    current_device(twin, device)
    expected = _calls(torch.ops.pangu_fastkd)[entry]()  # the CPU kernels, same arguments
    got = _calls(twin)[entry]()
    assert twin.twin_current_device() == device
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=2e-4, atol=2e-5)


def test_the_twin_counts_aten_ops(twin: ModuleType) -> None:
    # Without the count the checks below would pass vacuously.
    before = twin.twin_queued_aten_ops()
    torch.ones(3).add_(1)
    assert twin.twin_queued_aten_ops() > before


@pytest.mark.parametrize("entry", ENTRIES)
def test_an_unflushed_stream_is_refused(buggy_twin: ModuleType, entry: str) -> None:
    with pytest.raises(RuntimeError, match=UNFLUSHED):
        _calls(buggy_twin)[entry]()


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_missing_device_guard_is_refused(
    buggy_twin: ModuleType, current_device: Callable, entry: str
) -> None:
    current_device(buggy_twin, 1)
    with pytest.raises(RuntimeError, match=WRONG_DEVICE):
        _calls(buggy_twin)[entry]()


def test_inputs_on_two_devices_are_named(twin: ModuleType) -> None:
    # The twin has one device of the kernel's type, so two devices means a stray meta tensor;
    # the check compares with the first input's device before the device type.
    args = _sparse_kd_args()
    args[1] = args[1].to("meta")
    with pytest.raises(ValueError, match="weight is on meta but hidden is on cpu; every input"):
        twin.sparse_kd_fused(*args)
    q, k, v, cu = _attention_args()
    with pytest.raises(ValueError, match="v is on meta but q is on cpu; every input must be"):
        twin.packed_attention_fwd(q, k, v.to("meta"), cu, 0.25, True, -1)
