// Twin of the launcher header ascendc_library generates for the kernel sparse_kd_epilogue_fp32
// (csrc/ascend/sparse_kd_epilogue.cpp); defined in twin_launchers.cpp.
#pragma once

#include "aclrtlaunch_twin.h"

extern "C" uint32_t aclrtlaunch_sparse_kd_epilogue_fp32(uint32_t blockDim, aclrtStream stream,
                                                      void* logits, void* labels, void* ids,
                                                      void* teacherValues, void* teacherLse,
                                                      void* labelLogit, void* loss, void* stats,
                                                      void* tiling);
