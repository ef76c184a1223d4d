// Host twin of torch_npu's NPUStream.h: getCurrentNPUStream().stream(need_empty) with the
// signature the launch code calls. There is no device queue on CPU: the stream is a fixed
// non-null token, and the twin launchers (twin_launchers.cpp) run each kernel to completion before
// they return, so every launch is ordered after the ATen ops queued before it, as the real
// stream orders them.
#pragma once

#include <c10/core/Device.h>

#include <acl/acl.h>

namespace c10_npu {

class NPUStream {
 public:
  // need_empty: flush torch_npu's task queue before handing out the stream (nothing to flush).
  aclrtStream stream(bool need_empty = true) const {
    (void)need_empty;
    static int token = 0;
    return &token;
  }
};

inline NPUStream getCurrentNPUStream(c10::DeviceIndex device_index = -1) {
  (void)device_index;
  return NPUStream{};
}

}  // namespace c10_npu
