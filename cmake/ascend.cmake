# The Ascend C kernels: compiled by CANN's ascendc_library into static libraries and linked into
# a second Python module, pangu_fastkd/_ascend, whose host code (csrc/ascend/host) registers the
# NPU (PrivateUse1) implementations of the ops that _C declares.
#
# Inputs (cache variables; the environment variables of the same name are read as defaults):
#   PANGU_FASTKD_WITH_ASCEND        ON to build them (setup.py turns it on when CANN is found)
#   ASCEND_CANN_PACKAGE_PATH        CANN root; else $ASCEND_CANN_PACKAGE_PATH, $ASCEND_HOME_PATH,
#                                   /usr/local/Ascend/ascend-toolkit/latest
#   SOC_VERSION                     target chip, default Ascend910B1
#   PANGU_FASTKD_ASCEND_KERNEL_DIR  where the kernel sources (*.cpp) are, default csrc/ascend
#   TORCH_NPU_PATH                  torch_npu's package directory; default asks Python
#
# Everything that can go wrong is decided here at configure time, before any kernel is compiled.

set(PANGU_ASCEND_SKIP "pangu_fastkd: Ascend C kernels skipped")
if(NOT PANGU_FASTKD_WITH_ASCEND)
  message(STATUS "${PANGU_ASCEND_SKIP} (PANGU_FASTKD_WITH_ASCEND=OFF)")
  return()
endif()

set(PANGU_KNOWN_SOC_VERSIONS
    Ascend910B1 Ascend910B2 Ascend910B3 Ascend910B4
    Ascend310B1 Ascend310B2 Ascend310B3 Ascend310B4)
set(_soc_default Ascend910B1)
if(DEFINED ENV{SOC_VERSION} AND NOT "$ENV{SOC_VERSION}" STREQUAL "")
  set(_soc_default "$ENV{SOC_VERSION}")
endif()
set(SOC_VERSION "${_soc_default}" CACHE STRING "Ascend chip to compile the kernels for")
if(NOT SOC_VERSION IN_LIST PANGU_KNOWN_SOC_VERSIONS)
  string(REPLACE ";" ", " _known "${PANGU_KNOWN_SOC_VERSIONS}")
  message(FATAL_ERROR "SOC_VERSION=${SOC_VERSION} is not a chip these kernels target; expected one of ${_known}")
endif()

# First root that holds ascendc.cmake wins (CANN 8.x: tools/, older: compiler/).
set(_cann_candidates "${ASCEND_CANN_PACKAGE_PATH}" "$ENV{ASCEND_CANN_PACKAGE_PATH}"
    "$ENV{ASCEND_HOME_PATH}" "/usr/local/Ascend/ascend-toolkit/latest")
set(PANGU_ASCENDC_CMAKE "")
foreach(_root IN LISTS _cann_candidates)
  if(_root STREQUAL "" OR PANGU_ASCENDC_CMAKE)
    continue()
  endif()
  foreach(_sub tools/tikcpp/ascendc_kernel_cmake compiler/tikcpp/ascendc_kernel_cmake)
    if(NOT PANGU_ASCENDC_CMAKE AND EXISTS "${_root}/${_sub}/ascendc.cmake")
      set(PANGU_ASCENDC_CMAKE "${_root}/${_sub}/ascendc.cmake")
      set(ASCEND_CANN_PACKAGE_PATH "${_root}" CACHE PATH "CANN toolkit root" FORCE)
    endif()
  endforeach()
endforeach()
if(NOT PANGU_ASCENDC_CMAKE)
  message(FATAL_ERROR
    "PANGU_FASTKD_WITH_ASCEND=ON but no CANN toolkit found (no tools/tikcpp/ascendc_kernel_cmake/"
    "ascendc.cmake under ASCEND_CANN_PACKAGE_PATH, ASCEND_HOME_PATH or "
    "/usr/local/Ascend/ascend-toolkit/latest): source <CANN>/set_env.sh or set ASCEND_HOME_PATH")
endif()
message(STATUS "pangu_fastkd: CANN at ${ASCEND_CANN_PACKAGE_PATH}, SOC_VERSION=${SOC_VERSION}")

set(PANGU_FASTKD_ASCEND_KERNEL_DIR "${CMAKE_CURRENT_SOURCE_DIR}/csrc/ascend"
    CACHE PATH "Directory of the Ascend C kernel sources")
file(GLOB PANGU_ASCEND_KERNELS CONFIGURE_DEPENDS "${PANGU_FASTKD_ASCEND_KERNEL_DIR}/*.cpp")
if(NOT PANGU_ASCEND_KERNELS)
  message(STATUS "${PANGU_ASCEND_SKIP} (no kernel sources in ${PANGU_FASTKD_ASCEND_KERNEL_DIR}/*.cpp yet)")
  return()
endif()

if(NOT TORCH_NPU_PATH)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c
            "import importlib.util as u, os; s = u.find_spec('torch_npu'); print(os.path.dirname(s.origin) if s else '')"
    OUTPUT_VARIABLE _torch_npu_dir OUTPUT_STRIP_TRAILING_WHITESPACE)
  set(TORCH_NPU_PATH "${_torch_npu_dir}" CACHE PATH "torch_npu package directory")
endif()
if(NOT TORCH_NPU_PATH OR NOT EXISTS "${TORCH_NPU_PATH}/include")
  message(FATAL_ERROR
    "PANGU_FASTKD_WITH_ASCEND=ON but torch_npu was not found (TORCH_NPU_PATH='${TORCH_NPU_PATH}'): "
    "pip install the torch_npu that matches torch ${Torch_VERSION}")
endif()

set(_kernel_stems "")
foreach(_kernel IN LISTS PANGU_ASCEND_KERNELS)
  get_filename_component(_stem "${_kernel}" NAME_WE)
  string(APPEND _kernel_stems "${_stem},")
endforeach()

# Two kernel libraries, because their generated launch wrappers must differ. The Matmul kernels
# drive the cube through REGIST_MATMUL_OBJ, whose vector-core side waits on the system-workspace
# setup that only the generated wrapper does (SetSysWorkspaceForce, matmul::clearWorkspace on the
# cube core), and the wrapper does it only when the library is compiled with HAVE_WORKSPACE and
# HAVE_TILING (their last two parameters are workspace and tiling), as CANN's Matmul
# kernel-launch sample does; without them the vector core deadlocks on 8.1-era CANN. The wrapper
# then hands the kernel the user part of the workspace, after the system part. The vector-only
# kernels take no workspace, so they are built without the definitions.
set(PANGU_ASCEND_MATMUL_STEMS packed_attention_fwd packed_attention_bwd)
set(_matmul_kernels "")
set(_vector_kernels "")
foreach(_kernel IN LISTS PANGU_ASCEND_KERNELS)
  get_filename_component(_stem "${_kernel}" NAME_WE)
  if(_stem IN_LIST PANGU_ASCEND_MATMUL_STEMS)
    list(APPEND _matmul_kernels "${_kernel}")
  else()
    list(APPEND _vector_kernels "${_kernel}")
  endif()
endforeach()

include("${PANGU_ASCENDC_CMAKE}")
set(_kernel_libraries "")
if(_matmul_kernels)
  ascendc_library(pangu_fastkd_ascend_matmul STATIC ${_matmul_kernels})
  # ascendc_library targets take their flags through the ascendc_* wrappers, not target_*.
  ascendc_compile_definitions(pangu_fastkd_ascend_matmul PRIVATE HAVE_WORKSPACE HAVE_TILING)
  ascendc_include_directories(pangu_fastkd_ascend_matmul PRIVATE
    "${CMAKE_CURRENT_SOURCE_DIR}/csrc/ascend")
  list(APPEND _kernel_libraries pangu_fastkd_ascend_matmul)
endif()
if(_vector_kernels)
  ascendc_library(pangu_fastkd_ascend_vector STATIC ${_vector_kernels})
  ascendc_include_directories(pangu_fastkd_ascend_vector PRIVATE
    "${CMAKE_CURRENT_SOURCE_DIR}/csrc/ascend")
  list(APPEND _kernel_libraries pangu_fastkd_ascend_vector)
endif()

file(GLOB PANGU_ASCEND_HOST CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/ascend/host/*.cpp")
Python3_add_library(_ascend MODULE ${PANGU_ASCEND_HOST})
target_include_directories(_ascend PRIVATE
  csrc "${TORCH_NPU_PATH}/include" "${ASCEND_CANN_PACKAGE_PATH}/include")
target_compile_definitions(_ascend PRIVATE
  TORCH_EXTENSION_NAME=_ascend TORCH_API_INCLUDE_EXTENSION_H
  PANGU_FASTKD_SOC_VERSION="${SOC_VERSION}" PANGU_FASTKD_ASCEND_KERNELS="${_kernel_stems}")
target_link_directories(_ascend PRIVATE
  "${TORCH_NPU_PATH}/lib" "${ASCEND_CANN_PACKAGE_PATH}/lib64")
# tiling_api and platform: the host Matmul tiling API and PlatformAscendCManager, which the
# attention host code (csrc/ascend/host/packed_attention_npu.cpp) plans the cube with; CANN's
# PlatformAscendCManager page names these two libraries for kernel-launch projects.
target_link_libraries(_ascend PRIVATE
  ${_kernel_libraries} ${TORCH_LIBRARIES} ${TORCH_PYTHON_LIBRARY} torch_npu ascendcl
  tiling_api platform)
message(STATUS "pangu_fastkd: building Ascend C kernels: ${PANGU_ASCEND_KERNELS}")
