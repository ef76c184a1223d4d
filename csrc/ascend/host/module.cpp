// The Python module pangu_fastkd/_ascend. Loading it runs the TORCH_LIBRARY_IMPL(pangu_fastkd,
// PrivateUse1, ...) blocks of the other files in this directory, which register the NPU kernels of
// the ops that pangu_fastkd/_C declares (so _C must be loaded first; pangu_fastkd/_native.py does).
//
// The CPU twin build (PANGU_FASTKD_ASCEND_TWIN, tests/ascend_host_build.py) compiles the same host
// code against stand-ins for CANN and torch_npu and runs the kernels on CPU. It registers nothing
// with the dispatcher (see sparse_kd_npu.cpp for why); instead this module exposes the host
// implementations as plain functions taking CPU tensors, so the tests can call them directly.
#include <torch/extension.h>

#include "npu_launch.h"

#include <sstream>
#include <string>

#ifndef PANGU_FASTKD_SOC_VERSION
#error "PANGU_FASTKD_SOC_VERSION is set by cmake/ascend.cmake"
#endif
#ifndef PANGU_FASTKD_ASCEND_KERNELS
#error "PANGU_FASTKD_ASCEND_KERNELS is set by cmake/ascend.cmake"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "pangu_fastkd Ascend C kernels (NPU implementations of torch.ops.pangu_fastkd)";
  module.def("build_info", [] {
    pybind11::dict info;
    info["soc_version"] = std::string(PANGU_FASTKD_SOC_VERSION);
    // Kernel source stems compiled into this build, comma separated by CMake.
    pybind11::list kernels;
    std::stringstream stems(PANGU_FASTKD_ASCEND_KERNELS);
    for (std::string stem; std::getline(stems, stem, ',');) {
      if (!stem.empty()) kernels.append(stem);
    }
    info["kernels"] = kernels;
#ifdef PANGU_FASTKD_ASCEND_TWIN
    info["twin"] = true;
#else
    info["twin"] = false;
#endif
    return info;
  });
#ifdef PANGU_FASTKD_ASCEND_TWIN
  module.def("sparse_kd_fused",
             &pangu_fastkd::sparse_kd::op_entry<pangu_fastkd::ascend::sparse_kd_fused_npu>,
             "torch.ops.pangu_fastkd.sparse_kd_fused through the Ascend C epilogue on the CPU twin "
             "(arguments as the op schema in csrc/ops.cpp)");
  module.def("packed_attention_fwd", &pangu_fastkd::ascend::packed_attention_fwd_npu,
             "torch.ops.pangu_fastkd.packed_attention_fwd through the Ascend C kernel on the CPU "
             "twin (arguments as the op schema in csrc/ops.cpp; causal, windowless only)");
  module.def("packed_attention_fwd_plan", &pangu_fastkd::ascend::packed_attention_fwd_plan_npu,
             "(tile, blockDim, work items, workspace bytes) the forward would launch for "
             "(q, k, v, cu_seqlens, scale)");
  module.def("packed_attention_bwd", &pangu_fastkd::ascend::packed_attention_bwd_npu,
             "torch.ops.pangu_fastkd.packed_attention_bwd through the two Ascend C kernels on the "
             "CPU twin (arguments as the op schema in csrc/ops.cpp; causal, windowless only)");
  module.def("packed_attention_bwd_plan", &pangu_fastkd::ascend::packed_attention_bwd_plan_npu,
             "(tile, dQ blockDim, dK/dV blockDim, workspace bytes) the backward would launch for "
             "(q, k, v, cu_seqlens, scale)");
  // The twin runtime state the launchers check (tests/ascend_twin/host/twin_npu_runtime.h), for
  // the tests: a thread whose current device is not the inputs' one, as torch.npu.set_device
  // would leave it, and the count of ATen ops run since torch_npu's task queue was last flushed.
  module.def(
      "twin_set_device", [](int device) { twin_npu::this_thread().current_device = device; },
      "make `device` the calling thread's current twin NPU (the tensors are on device 0)");
  module.def(
      "twin_current_device", [] { return twin_npu::this_thread().current_device; },
      "the calling thread's current twin NPU");
  module.def(
      "twin_queued_aten_ops", [] { return twin_npu::this_thread().queued_aten_ops; },
      "ATen ops the calling thread ran since the twin's task queue was last flushed");
#endif
}
