// What every generated launcher header of the twin shares: the ACLRT_LAUNCH_KERNEL macro.
// ascendc_library generates one header aclrtlaunch_<kernel>.h per kernel, declaring
// `uint32_t aclrtlaunch_<kernel>(uint32_t blockDim, aclrtStream stream, <kernel args>)` (GM_ADDR
// arguments as void*), and ACLRT_LAUNCH_KERNEL(kernel) names that function. The twin headers
// declare the same functions; twin_launchers.cpp defines them on top of twin::Launch.
#pragma once

#include <acl/acl.h>

#include <cstdint>

#ifndef ACLRT_LAUNCH_KERNEL
#define ACLRT_LAUNCH_KERNEL(kernel_func) aclrtlaunch_##kernel_func
#endif
