// Host-side helpers shared by the launch code of every Ascend C kernel (csrc/ascend/host/*.cpp).
// Compiled only in the Ascend build (cmake/ascend.cmake), which needs CANN and torch_npu.
//
// A kernel `foo` compiled by ascendc_library gets a generated launcher header
// `aclrtlaunch_foo.h`; the host calls it as `ACLRT_LAUNCH_KERNEL(foo)(block_dim, stream, args...)`,
// the library form of `foo<<<block_dim, nullptr, stream>>>(args...)`. It must run on the stream
// torch_npu is using, or the kernel races the ops queued before and after it.
#pragma once

#include <torch/extension.h>

#include <acl/acl.h>

#include <cstdint>

#include "torch_npu/csrc/core/npu/NPUStream.h"

namespace pangu_fastkd::ascend {

// The stream torch_npu queues this thread's work on (false: do not flush the task queue here).
inline aclrtStream current_stream() { return c10_npu::getCurrentNPUStream().stream(false); }

// Kernels read raw global memory: the tensor must be on the NPU, dense and of the expected type.
inline void check_npu_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().type() == c10::DeviceType::PrivateUse1, name,
              " must be on the NPU, got a tensor on ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

// GM_ADDR of a tensor, as the generated launchers take it.
inline uint8_t* gm_addr(const at::Tensor& t) { return static_cast<uint8_t*>(t.data_ptr()); }

// Blocks for `work_items` independent items on a chip with `cores` AI cores: never more blocks
// than cores, because kernels that call SyncAll hang when some blocks are not resident.
inline uint32_t block_dim(int64_t work_items, uint32_t cores) {
  TORCH_CHECK(cores > 0, "the chip reports no AI cores");
  if (work_items <= 0) return 1;
  return static_cast<uint32_t>(std::min<int64_t>(work_items, cores));
}

}  // namespace pangu_fastkd::ascend
