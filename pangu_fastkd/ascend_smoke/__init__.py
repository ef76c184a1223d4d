"""First-run kit for an Ascend NPU: environment, correctness and timing of every Ascend C kernel.

Run it on an Atlas 800T A2 (Ascend 910B) or Atlas 200I A2 (Ascend 310B) right after
``pip install --no-build-isolation -e .`` with CANN and torch_npu installed, and paste its whole
output into the bug report::

    source /usr/local/Ascend/ascend-toolkit/set_env.sh
    python -m pangu_fastkd.ascend_smoke                   # full grid, with timing, on npu:0
    python -m pangu_fastkd.ascend_smoke --quick           # small grid (about a minute)
    python -m pangu_fastkd.ascend_smoke --no-timing       # correctness only
    python -m pangu_fastkd.ascend_smoke --json smoke.json --device npu:1

It prints the environment (pangu_fastkd version and ``build_info()``, torch, torch_npu, CANN
version, chip, device count, ``npu-smi info`` when that tool is there), then one markdown table
with a row per (op, case, dtype) and an overall ``PASS``/``FAIL`` line. Exit status: 0 when every
row passes, 1 when a row fails, 2 when it cannot run at all (no torch_npu, no NPU, or a build
without the Ascend C kernels; that is said in one line). Progress goes to stderr, one line per
row, so a hang shows which case it was in.

What is checked (the project's rule, as in tests/test_ascend_host*.py): each kernel's outputs
are compared with the PyTorch references of ``pangu_fastkd.ops`` run in float64 on the CPU on
the same (rounded) inputs. A row passes when, for each output, ``max |ours - exact|`` is at most
``2 x max |plain PyTorch - exact| + 1e-5 x max |exact|``, where plain PyTorch is the same math in
the row's dtype (for fp32 that is a tight bound). The ``worst`` column names the output closest
to (or furthest over) its bound.

- ``sparse_kd_fused``: ``torch.ops.pangu_fastkd.sparse_kd_fused`` (loss, per-row losses from its
  statistics, gradients of hidden, weight and bias) against ``sparse_kd_reference`` + autograd;
  timed against the reference's forward + backward on the same device.
- ``packed_attention fwd`` (out, lse) and ``packed_attention fwd+bwd`` (grads of q, k, v):
  ``packed_attention_fwd`` / ``_bwd`` against ``packed_attention_reference`` + autograd; timed
  against ``torch_npu.npu_fusion_attention`` in TND layout (the project's own fallback,
  ``pangu_fastkd.ops.packed_attention._npu_fusion_attention``) and the reference.

Times are medians of ``--reps`` calls after warmup, each call followed by a device
synchronisation; ``speedup`` is baseline time / our time (above 1: ours is faster).

The op calls go through a backend object: ``NpuBackend`` (the dispatcher ops on NPU tensors, the
real path) or ``TwinBackend`` (the same host code compiled for CPU, tests/ascend_host_build.py),
which is how tests/test_ascend_smoke.py runs this kit on a machine without an NPU.

Modules, in the order a run uses them:

- ``cli``: the flags, the run, the exit status (``__main__`` calls its ``main``);
- ``op_backends``: ``Backend``, ``NpuBackend``, ``TwinBackend`` (where the op calls go);
- ``environment``: versions, the build, the CANN version, the chip, ``npu-smi info``;
- ``cases``: the grid's sparse-KD and attention cases and its dtypes;
- ``sparse_kd_check``, ``attention_check``: one op family each against its reference, and timed;
- ``compare``: the pass rule and the table's ``Row``; ``timing``: median times and baselines;
- ``runner``: ``run_grid``, every (op, case, dtype) into a row;
- ``report``: the environment section, the markdown table, the strict-JSON record;
- ``errors``: the "cannot run here" error and how an exception reads in a row's note.

Nothing in the package imports this kit: it is a tool on top of ``ops``.
"""
