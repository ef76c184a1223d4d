// Twin of the launcher header ascendc_library generates for the kernel packed_attention_fwd_fp32
// (csrc/ascend/packed_attention_fwd.cpp); defined in twin_launchers.cpp.
#pragma once

#include "aclrtlaunch_twin.h"

extern "C" uint32_t aclrtlaunch_packed_attention_fwd_fp32(uint32_t blockDim, aclrtStream stream,
                                                       void* q, void* k, void* v, void* cuSeqlens,
                                                       void* out, void* lse, void* workspace,
                                                       void* tiling);
