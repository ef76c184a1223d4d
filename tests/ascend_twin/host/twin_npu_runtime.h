// The host twin's model of the torch_npu runtime state a kernel launch depends on: the thread's
// current device, and the ATen work torch_npu has queued but not yet submitted to the stream.
// Shared by the stand-in torch_npu headers (torch_npu/csrc/core/npu/NPUStream.h and NPUGuard.h,
// which the host code includes) and the twin launchers (twin_launchers.cpp), which check it at
// every launch. No torch header here: twin_launchers.cpp must not parse ATen.
//
// Why these two facts: torch_npu runs ATen ops through a task queue that a worker thread drains
// onto the stream, so a launch on the raw stream overtakes the ops queued before it unless the
// stream was taken with stream(true) (which empties the queue) after the last of them; and
// getCurrentNPUStream() is the current device's stream, which is the inputs' device only under a
// device guard. On CPU nothing is queued and there is one device, so both mistakes would pass
// unnoticed; the twin keeps the state they depend on and the launchers refuse a launch that the
// real runtime would have run out of order or on the wrong device.
#pragma once

#include <cstdint>

#include <acl/acl.h>

namespace twin_npu {

// The device the twin's tensors are on. Every CPU tensor is on the twin's device 0 (torch_npu
// numbers NPUs from 0); a test may make another device current to play a thread whose current
// NPU is not the inputs' one (module.cpp binds twin_set_device for that).
inline constexpr int kTensorDevice = 0;
// Devices a twin stream handle can name, as on an 8-NPU host plus headroom.
inline constexpr int kDevices = 16;

struct ThreadState {
  // What c10_npu::NPUGuard sets and getCurrentNPUStream() reads; per thread, as in torch_npu.
  int current_device = 0;
  // ATen ops run on this thread since torch_npu's task queue was last emptied: on CPU they ran
  // eagerly, on an NPU they could still be waiting in the queue. Counted by a RecordFunction
  // callback (NPUStream.h), reset by NPUStream::stream(true).
  uint64_t queued_aten_ops = 0;
};

// One state per thread; an inline function's static, so it is the same object in every
// translation unit of a module.
inline ThreadState& this_thread() {
  thread_local ThreadState state;
  return state;
}

// A twin stream handle: the current stream of one device. Handles point into one static array,
// so a launcher can tell a twin handle from anything else.
struct Stream {
  int device;
};

inline Stream* streams() {
  static Stream all[kDevices] = {{0}, {1}, {2},  {3},  {4},  {5},  {6},  {7},
                                 {8}, {9}, {10}, {11}, {12}, {13}, {14}, {15}};
  return all;
}

// The handle of `device`'s current stream; null for a device the twin does not have.
inline aclrtStream stream_handle(int device) {
  return device >= 0 && device < kDevices ? static_cast<aclrtStream>(&streams()[device]) : nullptr;
}

// The stream a handle names, or null when it is not a twin handle.
inline const Stream* stream_of(aclrtStream handle) {
  for (int d = 0; d < kDevices; ++d) {
    if (handle == static_cast<aclrtStream>(&streams()[d])) return &streams()[d];
  }
  return nullptr;
}

}  // namespace twin_npu
