// Host twin of CANN's acl/acl.h: only the stream handle and error type the launch code uses.
// Compiled in the twin build (PANGU_FASTKD_ASCEND_TWIN, tests/ascend_twin/host first on the include
// path); the real build takes CANN's header. See README.md next to this file.
#pragma once

#include <cstdint>

typedef void* aclrtStream;  // an opaque handle, as in CANN
typedef int aclError;

#ifndef ACL_SUCCESS
#define ACL_SUCCESS 0
#endif
