// Host twin of torch_npu's NPUGuard.h: c10_npu::NPUGuard, which makes a device the thread's
// current one for its scope and restores the previous one after, on the twin runtime state
// (twin_npu_runtime.h). CPU tensors stand for tensors on the twin's device 0, so a guard built
// from a CPU tensor's device makes device 0 current; the real guard refuses a non-NPU device, the
// twin one a non-CPU device, for the same reason.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include "twin_npu_runtime.h"

namespace c10_npu {

struct NPUGuard {
  explicit NPUGuard() = delete;

  explicit NPUGuard(c10::DeviceIndex device_index)
      : original_(twin_npu::this_thread().current_device) {
    TORCH_CHECK(device_index >= 0 && device_index < twin_npu::kDevices,
                "NPUGuard (host twin): device index ", int(device_index), " is not a twin device");
    twin_npu::this_thread().current_device = device_index;
  }

  // The device of a CPU tensor (index -1 or 0) is the twin's device kTensorDevice.
  explicit NPUGuard(c10::Device device) : NPUGuard(twin_index(device)) {}

  NPUGuard(const NPUGuard&) = delete;
  NPUGuard& operator=(const NPUGuard&) = delete;
  NPUGuard(NPUGuard&&) = delete;
  NPUGuard& operator=(NPUGuard&&) = delete;

  ~NPUGuard() { twin_npu::this_thread().current_device = original_; }

 private:
  static c10::DeviceIndex twin_index(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "NPUGuard (host twin): expected a CPU device (the twin's NPU), got ",
                device);
    return twin_npu::kTensorDevice;
  }

  int original_;
};

}  // namespace c10_npu
