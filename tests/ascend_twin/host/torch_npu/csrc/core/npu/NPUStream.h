// Host twin of torch_npu's NPUStream.h: getCurrentNPUStream(device).stream(need_empty) with the
// signatures of torch_npu 2.13, on top of the twin runtime state (twin_npu_runtime.h).
//
// torch_npu queues ATen ops on a task queue that a worker thread submits to the stream; the raw
// stream a launcher takes does not see what is still queued. stream(true) (and stream(), which
// torch_npu implements as stream(true)) empties the queue first; stream(false) does not. On CPU
// the ops have already run, so the twin keeps count instead: a RecordFunction callback counts the
// ATen ops this thread runs, stream(true) resets the count, and the twin launchers refuse a launch
// while it is non-zero. The count is conservative (it also counts ops torch_npu would not queue,
// such as allocations, and a synchronising copy does not reset it), which only ever asks for a
// flush where one is harmless.
#pragma once

#include <ATen/record_function.h>
#include <c10/core/Device.h>

#include <acl/acl.h>

#include <memory>

#include "twin_npu_runtime.h"

namespace c10_npu {

class NPUStream {
 public:
  explicit NPUStream(c10::DeviceIndex device_index) : device_index_(device_index) {}

  c10::DeviceIndex device_index() const { return device_index_; }

  // torch_npu: "Explicit conversion to rtStream_t", after emptying the task queue.
  aclrtStream stream() const { return stream(true); }
  // torch_npu: "Explicit conversion to rtStream_t, with out empty taskQ" when need_empty is false.
  aclrtStream stream(const bool need_empty) const {
    if (need_empty) twin_npu::this_thread().queued_aten_ops = 0;
    return twin_npu::stream_handle(device_index_);
  }
  operator aclrtStream() const { return stream(); }

 private:
  c10::DeviceIndex device_index_;
};

// The current stream of `device_index`, or of the thread's current device for -1 (which is the
// inputs' device only under a device guard).
inline NPUStream getCurrentNPUStream(c10::DeviceIndex device_index = -1) {
  return NPUStream(device_index < 0
                       ? static_cast<c10::DeviceIndex>(twin_npu::this_thread().current_device)
                       : device_index);
}

namespace twin_detail {

inline std::unique_ptr<at::ObserverContext> count_aten_op(const at::RecordFunction&) {
  ++twin_npu::this_thread().queued_aten_ops;
  return nullptr;
}

// Installed when the module loads, before any host code runs; every ATen op of every thread is
// counted from then on (the callback is one increment).
inline const bool aten_op_counter_installed = [] {
  at::addGlobalCallback(
      at::RecordFunctionCallback(&count_aten_op).scopes({at::RecordScope::FUNCTION}));
  return true;
}();

}  // namespace twin_detail
}  // namespace c10_npu
