"""The grid run: every (op, case, dtype) checked and timed on a backend, one row each."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .attention_check import check_attention, time_attention
from .cases import DTYPES, attention_cases, sparse_kd_cases
from .compare import Row
from .errors import first_line
from .op_backends import Backend
from .sparse_kd_check import check_sparse_kd, time_sparse_kd
from .timing import Timer


def run_grid(
    backend: Backend,
    *,
    quick: bool = False,
    timing: bool = True,
    reps: int = 10,
    warmup: int = 3,
    dtypes: Sequence[str] = tuple(DTYPES),
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Every (op, case, dtype) of the grid on ``backend``; an exception makes a FAIL row.

    ``progress`` gets one line per finished row, so a hang shows which case it was in.
    """
    timer = Timer(backend, reps, warmup)
    rows: list[Row] = []
    total = len(dtypes) * (len(sparse_kd_cases(quick)) + 2 * len(attention_cases(quick)))

    def report(row: Row) -> None:
        rows.append(row)
        if progress is not None:
            verdict = "PASS" if row.passed else "FAIL"
            note = f" ({row.note})" if row.note else ""
            progress(f"[{len(rows)}/{total}] {row.op} {row.case} {row.dtype}: {verdict}{note}")

    for case in sparse_kd_cases(quick):
        for dtype_name in dtypes:
            row = Row("sparse_kd_fused", case.name, dtype_name)
            try:
                device_args = check_sparse_kd(backend, case, DTYPES[dtype_name], row)
                if timing:
                    time_sparse_kd(backend, case, device_args, timer, row)
            except Exception as exc:
                what = "timing: " if row.error is not None else ""
                row.passed, row.note = False, what + first_line(exc)
            report(row)
    for case in attention_cases(quick):
        for dtype_name in dtypes:
            fwd = Row("packed_attention fwd", case.name, dtype_name)
            bwd = Row("packed_attention fwd+bwd", case.name, dtype_name)
            try:
                tensors = check_attention(backend, case, DTYPES[dtype_name], fwd, bwd)
            except Exception as exc:
                # The forward's own errors are caught inside; what lands here is the backward's,
                # or the references' (then neither row was judged).
                tensors = []
                for r in (fwd, bwd) if fwd.error is None and not fwd.note else (bwd,):
                    r.passed, r.note = False, first_line(exc)
            if timing and tensors:
                try:
                    time_attention(backend, case, tensors, timer, fwd, bwd)
                except Exception as exc:
                    for r in (fwd, bwd):
                        r.passed, r.note = False, f"timing: {first_line(exc)}"
            report(fwd)
            report(bwd)
    return rows
