// Host-side helpers shared by the launch code of every Ascend C kernel (csrc/ascend/host/*.cpp).
// Compiled in the Ascend build (cmake/ascend.cmake), which needs CANN and torch_npu, and in the
// CPU twin build (PANGU_FASTKD_ASCEND_TWIN, tests/test_ascend_host.py), which finds stand-ins
// for the CANN and torch_npu headers in tests/ascend_twin/host and runs the kernels on CPU.
//
// A kernel `foo` compiled by ascendc_library gets a generated launcher header
// `aclrtlaunch_foo.h`; the host calls it as `ACLRT_LAUNCH_KERNEL(foo)(block_dim, stream, args...)`,
// the library form of `foo<<<block_dim, nullptr, stream>>>(args...)`. It must run on the stream
// torch_npu is using, or the kernel races the ops queued before and after it, and on the device
// its tensors are on: each host entry holds a c10_npu::NPUGuard for its inputs' device, and every
// launch goes through PANGU_FASTKD_LAUNCH_KERNEL, which takes the stream in the launch itself.
#pragma once

#include <torch/extension.h>

#include <acl/acl.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "common/sparse_kd_args.h"
#include "tiling/platform/platform_ascendc.h"
#include "torch_npu/csrc/core/npu/NPUGuard.h"
#include "torch_npu/csrc/core/npu/NPUStream.h"

#ifndef PANGU_FASTKD_SOC_VERSION
#error "PANGU_FASTKD_SOC_VERSION is set by cmake/ascend.cmake (or the twin build)"
#endif

namespace pangu_fastkd::ascend {

// The device the kernels' tensors live on. The twin build runs the same host code on CPU
// tensors (their data pointers are what the twin's kernels read); the real build takes only
// NPU (PrivateUse1) tensors, whose data pointers are device addresses.
#ifdef PANGU_FASTKD_ASCEND_TWIN
inline constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;
#else
inline constexpr c10::DeviceType kKernelDevice = c10::DeviceType::PrivateUse1;
#endif

// The chip family the module was built for; host tilings take their UB budget from it.
enum class SocFamily { kAscend910B, kAscend310B };

inline constexpr SocFamily soc_family() {
  constexpr std::string_view soc = PANGU_FASTKD_SOC_VERSION;
  static_assert(soc.substr(0, 10) == "Ascend910B" || soc.substr(0, 10) == "Ascend310B",
                "PANGU_FASTKD_SOC_VERSION must name an Ascend910B* or Ascend310B* chip");
  return soc.substr(0, 10) == "Ascend910B" ? SocFamily::kAscend910B : SocFamily::kAscend310B;
}

namespace {
// The platform of the part the module was built for: its core counts (910B1 24 AIC + 48 AIV,
// 910B4 20 + 40) and buffer sizes, for the host tilings. Internal linkage, one per translation
// unit: the twin build constructs the twin part's platform itself instead of asking the
// process-wide singleton, because a test process loads one twin module per chip and a singleton
// shared by them (inline-function statics of a header-only twin may be merged across modules)
// would plan the 310B module on the 910B.
inline const platform_ascendc::PlatformAscendC& soc_platform() {
#ifdef PANGU_FASTKD_ASCEND_TWIN
  static const platform_ascendc::PlatformAscendC platform{
      std::string_view(PANGU_FASTKD_SOC_VERSION)};
  return platform;
#else
  // Kernel-launch projects get the platform from PlatformAscendCManager; the SoC name pins it to
  // the chip the kernels were compiled for (links tiling_api and platform, cmake/ascend.cmake).
  static platform_ascendc::PlatformAscendC* const platform =
      platform_ascendc::PlatformAscendCManager::GetInstance(PANGU_FASTKD_SOC_VERSION);
  TORCH_CHECK(platform != nullptr, "pangu_fastkd: no Ascend platform information for ",
              PANGU_FASTKD_SOC_VERSION);
  return *platform;
#endif
}
}  // namespace

// The stream to launch on: the current device's current stream, after torch_npu's task queue
// has been emptied. torch_npu queues ATen ops (the logits GEMM, the tiling copy of
// tiling_on_device, .to() conversions) on a task queue that a worker thread submits to this
// stream; a raw launch on stream(false) goes straight to the stream and can overtake the queued
// ops that produce its inputs. stream(true) waits until the queue has been submitted, so it must
// be taken after the last ATen op the launch depends on: PANGU_FASTKD_LAUNCH_KERNEL calls this in
// the launch expression, and no launch site keeps a stream across ATen ops. (The alternative is to
// queue the launch itself, at_npu::native::OpCommand::RunOpApi(name, handler) in
// torch_npu/csrc/framework/OpCommand.h, which avoids the host wait but must also keep every tensor
// the kernel reads alive until the queued handler has run.)
inline aclrtStream launch_stream() {
  return c10_npu::getCurrentNPUStream().stream(/*need_empty=*/true);
}

// Launches `kernel` (a name ascendc_library generated a launcher for) with `block_dim` blocks and
// the kernel arguments `...` on launch_stream(), and checks the launcher's status. The stream is
// taken inside the launch expression, so no ATen op runs between the flush and the launch as long
// as the arguments are plain GM addresses computed beforehand (gm_addr reads a data pointer and
// runs no op).
#define PANGU_FASTKD_LAUNCH_KERNEL(kernel, block_dim, ...)                               \
  ::pangu_fastkd::ascend::check_launch(                                                 \
      ACLRT_LAUNCH_KERNEL(kernel)(block_dim, ::pangu_fastkd::ascend::launch_stream(),   \
                                  __VA_ARGS__),                                         \
      #kernel)

// Kernels read raw global memory: the tensor must be on the kernel device, dense and of the
// expected type.
inline void check_npu_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().type() == kKernelDevice, name, " must be on the ",
              c10::DeviceTypeName(kKernelDevice, /*lower_case=*/true), " device, got a tensor on ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

// GM_ADDR of a tensor, as the generated launchers take it; null for an absent optional input
// (kernels document which pointers they leave unread).
inline void* gm_addr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Blocks for `work_items` independent items on a chip with `cores` AI cores: never more blocks
// than cores, because kernels that call SyncAll hang when some blocks are not resident.
inline uint32_t block_dim(int64_t work_items, uint32_t cores) {
  TORCH_CHECK(cores > 0, "the chip reports no AI cores");
  if (work_items <= 0) return 1;
  return static_cast<uint32_t>(std::min<int64_t>(work_items, cores));
}

// A tiling struct in device memory, for kernels that take their tiling as a GM_ADDR (direct
// launches have no tiling-data mechanism). The copy is queued on the current stream before the
// launch that reads it; the caching allocator keeps the bytes until that launch has run even if
// the returned tensor dies first, as for any tensor a kernel reads.
template <class Tiling>
at::Tensor tiling_on_device(const Tiling& tiling, const at::Device& device) {
  static_assert(std::is_trivially_copyable_v<Tiling>, "a tiling is copied byte for byte");
  at::Tensor host = at::empty({int64_t(sizeof(Tiling))}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(host.data_ptr(), &tiling, sizeof(Tiling));
  if (device.is_cpu()) return host;
  return host.to(device);
}

// A kernel's GM workspace (scratch it alone reads and writes), `bytes` uninitialised bytes on
// `device` from the caching allocator: like any tensor a kernel reads, the allocator keeps the
// memory until the launch queued on the current stream has run, even if the tensor dies first.
inline at::Tensor workspace_on_device(uint64_t bytes, const at::Device& device) {
  TORCH_CHECK(bytes <= uint64_t(INT64_MAX), "workspace of ", bytes, " bytes");
  return at::empty({int64_t(bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
}

// The generated launchers return 0 on success, an ACL error code otherwise.
inline void check_launch(uint32_t status, const char* kernel) {
  TORCH_CHECK(status == 0, "launching the Ascend C kernel ", kernel, " failed with error ",
              status);
}

// ---------------------------------------------------------------------------------------------
// Host implementations, declared here so that the twin build's module.cpp can bind them
// (the real build reaches them through the dispatcher only).

// torch.ops.pangu_fastkd.sparse_kd_fused on the kernel device (csrc/ascend/host/sparse_kd_npu.cpp);
// arguments and results as the schema in csrc/ops.cpp and the CPU kernel csrc/cpu/sparse_kd.cpp,
// registered and bound as sparse_kd::op_entry<sparse_kd_fused_npu>.
sparse_kd::Outputs sparse_kd_fused_npu(const sparse_kd::Call& call);

// torch.ops.pangu_fastkd.packed_attention_fwd on the kernel device
// (csrc/ascend/host/packed_attention_npu.cpp): out [T, Hq, D] and lse [Hq, T] fp32 as the schema
// in csrc/ops.cpp and the CPU kernel csrc/cpu/packed_attention.cpp; causal and windowless only.
std::tuple<at::Tensor, at::Tensor> packed_attention_fwd_npu(const at::Tensor& q,
                                                             const at::Tensor& k,
                                                             const at::Tensor& v,
                                                             const at::Tensor& cu_seqlens,
                                                             double scale, bool causal,
                                                             int64_t window);

// What packed_attention_fwd_npu would launch for causal, windowless inputs: (tile, blockDim,
// work items, workspace bytes) of its tiling. For tests and diagnostics; launches nothing.
std::tuple<int64_t, int64_t, int64_t, int64_t> packed_attention_fwd_plan_npu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    double scale);

// torch.ops.pangu_fastkd.packed_attention_bwd on the kernel device (same file): grad_q
// [T, Hq, D], grad_k and grad_v [T, Hkv, D] in q's dtype, as the CPU kernel; causal and
// windowless only. Two kernel launches (dQ pass, then dK/dV pass) on the current stream.
std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_bwd_npu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens, double scale,
    bool causal, int64_t window);

// What packed_attention_bwd_npu would launch: (tile, dQ blockDim, dK/dV blockDim, workspace
// bytes) of its tiling. For tests and diagnostics; launches nothing.
std::tuple<int64_t, int64_t, int64_t, int64_t> packed_attention_bwd_plan_npu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    double scale);

}  // namespace pangu_fastkd::ascend
