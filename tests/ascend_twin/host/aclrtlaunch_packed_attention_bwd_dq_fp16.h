// Twin of the launcher header ascendc_library generates for the kernel packed_attention_bwd_dq_fp16
// (csrc/ascend/packed_attention_bwd.cpp); defined in twin_launchers.cpp.
#pragma once

#include "aclrtlaunch_twin.h"

extern "C" uint32_t aclrtlaunch_packed_attention_bwd_dq_fp16(uint32_t blockDim, aclrtStream stream,
                                                             void* gradOut, void* q, void* k,
                                                             void* v, void* out, void* lse,
                                                             void* cuSeqlens, void* gradQ,
                                                             void* workspace, void* tiling);
