# Brings the pinned llama.cpp into the build (add_subdirectory) with lamina's settings.
#
# Source: LAMINA_LLAMA_CPP_DIR (CMake define or environment variable) names a llama.cpp tree
# to build instead of the pin; otherwise fetch.py fetches the pinned package with pip,
# checks its sha256 and unpacks it into the user cache.

set(LAMINA_LLAMA_CPP_DIR "$ENV{LAMINA_LLAMA_CPP_DIR}" CACHE PATH
    "llama.cpp source tree to build instead of the pinned one (default: fetch the pin)")

file(READ "${CMAKE_CURRENT_LIST_DIR}/pin.json" _lamina_pin)
string(JSON LAMINA_LLAMA_CPP_COMMIT GET "${_lamina_pin}" llama_cpp_commit)
string(JSON LAMINA_LLAMA_CPP_VERSION GET "${_lamina_pin}" llama_cpp_version)

if(LAMINA_LLAMA_CPP_DIR)
  get_filename_component(LAMINA_LLAMA_CPP_DIR "${LAMINA_LLAMA_CPP_DIR}" ABSOLUTE)
  if(NOT EXISTS "${LAMINA_LLAMA_CPP_DIR}/include/llama.h")
    message(FATAL_ERROR "LAMINA_LLAMA_CPP_DIR=${LAMINA_LLAMA_CPP_DIR} is not a llama.cpp source tree "
                        "(no include/llama.h). Unset it to build the pinned llama.cpp.")
  endif()
  set(LAMINA_LLAMA_CPP_SOURCE "user tree")
  message(STATUS "lamina: building llama.cpp from ${LAMINA_LLAMA_CPP_DIR} (user tree, not the pin)")
else()
  # pip's isolated build puts its overlay on PYTHONPATH; fetch.py drops it to reach the user's pip.
  execute_process(
    COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_LIST_DIR}/fetch.py"
    OUTPUT_VARIABLE _lamina_src OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _lamina_rc)
  if(NOT _lamina_rc EQUAL 0)
    message(FATAL_ERROR "lamina: could not fetch the pinned llama.cpp (see the message above). "
                        "Alternatives: -DLAMINA_LLAMA_CPP_DIR=/path/to/llama.cpp, or "
                        "LAMINA_LLAMA_CPP_ARCHIVE=/path/to/the/pinned/file.")
  endif()
  set(LAMINA_LLAMA_CPP_DIR "${_lamina_src}")
  set(LAMINA_LLAMA_CPP_SOURCE "pin")
  message(STATUS "lamina: llama.cpp ${LAMINA_LLAMA_CPP_VERSION} (${LAMINA_LLAMA_CPP_COMMIT}) at ${LAMINA_LLAMA_CPP_DIR}")
endif()

# --- llama.cpp options (a user's -D wins over every default set here) ---------------------
macro(lamina_default var value)
  if(NOT DEFINED ${var})
    set(${var} ${value})
  endif()
endmacro()

set(BUILD_SHARED_LIBS ON)          # one copy of ggml shared by _native and the tools
lamina_default(LLAMA_BUILD_COMMON ON)   # common/fit.h, and the tools below
lamina_default(LLAMA_BUILD_TOOLS ${LAMINA_BUILD_TOOLS})
lamina_default(LLAMA_BUILD_TESTS OFF)
# examples/ holds llama-speculative-simple (a LAMINA_EXTRA_TOOLS program lamina bench compares with);
# its targets are configured only when an extra tool is asked for, and built only when named
if(LAMINA_BUILD_TOOLS AND LAMINA_EXTRA_TOOLS)
  lamina_default(LLAMA_BUILD_EXAMPLES ON)
else()
  lamina_default(LLAMA_BUILD_EXAMPLES OFF)
endif()
# llama-server only when asked for (the chat-template parity tests compare with its /apply-template)
if(LAMINA_BUILD_TOOLS AND "llama-server" IN_LIST LAMINA_EXTRA_TOOLS)
  lamina_default(LLAMA_BUILD_SERVER ON)
else()
  lamina_default(LLAMA_BUILD_SERVER OFF)
endif()
lamina_default(LLAMA_BUILD_APP OFF)
lamina_default(LLAMA_BUILD_UI OFF)
lamina_default(LLAMA_USE_PREBUILT_UI OFF)
lamina_default(LLAMA_OPENSSL OFF)
lamina_default(LLAMA_SUBPROCESS OFF)
lamina_default(LLAMA_BUILD_IS_DEV OFF)
lamina_default(LLAMA_BUILD_NUMBER 0)
lamina_default(LLAMA_BUILD_COMMIT ${LAMINA_LLAMA_CPP_COMMIT})
# ggml's own thread pool instead of OpenMP: with OpenMP, a pool's CPU mask and priority land on
# OpenMP's process-wide threads, which every context then shares, so two contexts cannot each
# keep their own pinning (see cpp/threadpool.cpp). Decode speed: see the thread-pinning issue note.
lamina_default(GGML_OPENMP OFF)
# RPC: remote devices (lamina rpc-server), and on 127.0.0.1 a real offload device for the tests on
# any machine. Cost measured in the RPC issue's note; -DGGML_RPC=OFF leaves it out.
lamina_default(GGML_RPC ON)

if(LAMINA_PORTABLE)
  # Wheels: every CPU variant as a loadable backend, the best one picked at run time.
  set(GGML_NATIVE OFF)
  set(GGML_BACKEND_DL ON)
  set(GGML_CPU_ALL_VARIANTS ON)
else()
  lamina_default(GGML_NATIVE ON)
endif()

if(GGML_CUDA)
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    message(FATAL_ERROR "GGML_CUDA=ON but no CUDA compiler (nvcc) was found: install the CUDA "
                        "toolkit and put nvcc on PATH (or set CUDACXX), or build without GGML_CUDA.")
  endif()
endif()
if(GGML_VULKAN)
  find_package(Vulkan QUIET COMPONENTS glslc)
  if(NOT Vulkan_FOUND OR NOT Vulkan_GLSLC_EXECUTABLE)
    message(FATAL_ERROR "GGML_VULKAN=ON but the Vulkan SDK (headers, loader, glslc) was not found: "
                        "install libvulkan-dev and glslc (Debian/Ubuntu) or the LunarG SDK, "
                        "or pass -DVulkan_INCLUDE_DIR=..., or build without GGML_VULKAN.")
  endif()
endif()
if(GGML_METAL AND NOT APPLE)
  message(FATAL_ERROR "GGML_METAL=ON needs macOS: build without GGML_METAL on this system.")
endif()

# Hidden by default: only what llama.cpp marks LLAMA_API / GGML_API is visible outside its library
# (see exports.map below for the rest of the story).
option(LAMINA_HIDDEN_VISIBILITY "Build llama.cpp with hidden visibility (only the C API visible)" ON)
if(LAMINA_HIDDEN_VISIBILITY)
  set(CMAKE_C_VISIBILITY_PRESET hidden)
  set(CMAKE_CXX_VISIBILITY_PRESET hidden)
  set(CMAKE_CUDA_VISIBILITY_PRESET hidden)
  set(CMAKE_VISIBILITY_INLINES_HIDDEN ON)
endif()
add_subdirectory("${LAMINA_LLAMA_CPP_DIR}" llama.cpp EXCLUDE_FROM_ALL)
# llama.cpp's programs call common/'s C++ functions, which carry no export macro: their libraries
# keep default visibility (they are never loaded by Python; see LAMINA_TOOL_LIBS)
foreach(t llama-common llama-common-base cpp-httplib)
  if(TARGET ${t})
    set_target_properties(${t} PROPERTIES C_VISIBILITY_PRESET default CXX_VISIBILITY_PRESET default
                                          VISIBILITY_INLINES_HIDDEN OFF)
  endif()
endforeach()

# --- living in someone else's process -------------------------------------------------------
# lamina is loaded next to numpy, torch, jax and cupy. Every shared library that Python loads
# exports only llama.cpp's and ggml's C API (exports.map, checked by tests/test_exports.py):
# nothing else (the C++ runtime's template instances, their static locals and guard variables,
# cuda::std objects) can interpose with another library's copy in the same process.
set(LAMINA_EXPORTS_MAP "${CMAKE_CURRENT_LIST_DIR}/exports.map")
function(lamina_export_c_api_only target)
  target_link_options(${target} PRIVATE "LINKER:--version-script=${LAMINA_EXPORTS_MAP}")
  set_property(TARGET ${target} APPEND PROPERTY LINK_DEPENDS "${LAMINA_EXPORTS_MAP}")
endfunction()

# The module uses llama.cpp's common/ (fit.cpp: the no-alloc memory fit, and what it pulls in). It
# is compiled into the module itself, hidden, instead of loading libllama-common.so, which is
# built for llama.cpp's programs: that library also carries cpp-httplib and its thread-local state
# (a TLS segment that every thread of the process pays for: 15 KiB here, 64 KiB aligned to 64 in
# the CUDA build) and exports its whole C++ surface. A static archive of common/ without the
# download code: the linker takes only the objects the module needs.
get_target_property(LAMINA_COMMON_SOURCES llama-common SOURCES)
list(FILTER LAMINA_COMMON_SOURCES INCLUDE REGEX "\\.cpp$")
list(FILTER LAMINA_COMMON_SOURCES EXCLUDE REGEX "(^|/)(download|hf-cache|arg|preset)\\.cpp$")
list(TRANSFORM LAMINA_COMMON_SOURCES PREPEND "${LAMINA_LLAMA_CPP_DIR}/common/" REGEX "^[^/]")
add_library(lamina-common STATIC EXCLUDE_FROM_ALL ${LAMINA_COMMON_SOURCES})
# SYSTEM: lamina's -Wall -Wextra -Werror is for lamina's code, not for common/'s headers
target_include_directories(lamina-common SYSTEM PUBLIC "${LAMINA_LLAMA_CPP_DIR}/common"
                                         PRIVATE "${LAMINA_LLAMA_CPP_DIR}/src")
target_link_libraries(lamina-common PUBLIC llama ggml llama-common-base vendor::nlohmann vendor::sheredom)
target_compile_features(lamina-common PUBLIC cxx_std_17)
set_target_properties(lamina-common PROPERTIES POSITION_INDEPENDENT_CODE ON
  CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON)

# Everything lamina ships from llama.cpp; one file per library (no versioned symlinks in wheels).
# LAMINA_LLAMA_LIBS are loaded by Python (lamina/); LAMINA_TOOL_LIBS only by the programs in
# lamina/bin/, and live there, so `import lamina` never maps them.
set(LAMINA_LLAMA_LIBS llama ggml ggml-base ${GGML_AVAILABLE_BACKENDS})
set(LAMINA_TOOL_LIBS)
set(LAMINA_LLAMA_TOOLS)
if(LAMINA_BUILD_TOOLS)
  list(APPEND LAMINA_TOOL_LIBS llama-common llama-bench-impl)
  list(APPEND LAMINA_LLAMA_TOOLS llama-bench)
  if(GGML_RPC)
    list(APPEND LAMINA_LLAMA_TOOLS ggml-rpc-server)
  endif()
  # more llama.cpp programs from the same source, e.g. -DLAMINA_EXTRA_TOOLS="llama-quantize;llama-completion"
  foreach(tool IN LISTS LAMINA_EXTRA_TOOLS)
    if(NOT TARGET ${tool})
      message(FATAL_ERROR "LAMINA_EXTRA_TOOLS: llama.cpp has no target '${tool}'")
    endif()
    list(APPEND LAMINA_LLAMA_TOOLS ${tool})
    if(TARGET ${tool}-impl)  # tools keep their logic in a library of their own
      list(APPEND LAMINA_TOOL_LIBS ${tool}-impl)
    endif()
    if(tool STREQUAL "llama-server" AND TARGET mtmd)  # its multimodal library
      list(APPEND LAMINA_TOOL_LIBS mtmd)
    endif()
  endforeach()
endif()
foreach(t IN LISTS LAMINA_LLAMA_LIBS LAMINA_TOOL_LIBS)
  set_property(TARGET ${t} PROPERTY VERSION)       # unset: libX.so only, DT_NEEDED libX.so
  set_property(TARGET ${t} PROPERTY SOVERSION)
  set_property(TARGET ${t} PROPERTY PUBLIC_HEADER)  # headers stay out of the wheel
endforeach()
foreach(t IN LISTS LAMINA_LLAMA_LIBS)
  set_target_properties(${t} PROPERTIES INSTALL_RPATH "$ORIGIN")
  lamina_export_c_api_only(${t})
endforeach()
foreach(t IN LISTS LAMINA_TOOL_LIBS LAMINA_LLAMA_TOOLS)
  set_target_properties(${t} PROPERTIES INSTALL_RPATH "$ORIGIN:$ORIGIN/.."
    C_VISIBILITY_PRESET default CXX_VISIBILITY_PRESET default VISIBILITY_INLINES_HIDDEN OFF)
endforeach()
