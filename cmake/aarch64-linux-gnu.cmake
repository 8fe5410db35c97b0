# CMake toolchain file: cross-compiles LLMProxy for 64-bit ARM Linux (aarch64, Debian's arm64) on a
# Debian 12 amd64 machine, with Debian's cross compiler and Debian's own arm64 libraries installed
# through multiarch (dpkg --add-architecture arm64; apt-get install libfoo-dev:arm64).
# scripts/arm64-check.sh installs all of that, builds with this file and runs the result under QEMU.
#
#   cmake -S . -B build-arm64 -G Ninja -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
#     [-DLLMPROXY_AARCH64_EXTRA_ROOT=DIR]
#
# LLMPROXY_AARCH64_EXTRA_ROOT (optional): a directory holding unpacked arm64 -dev packages that
# cannot be installed next to their amd64 twins because Debian does not mark them "Multi-Arch:
# same" (libsimdjson-dev, libyaml-cpp-dev; prometheus-cpp-dev through its dependency on the
# civetweb program). Its usr/ tree is searched before the system's.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_LIBRARY_ARCHITECTURE aarch64-linux-gnu)

set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# Nothing is ever run at configure time, but say where an aarch64 program would run.
find_program(LLMPROXY_QEMU_AARCH64 qemu-aarch64-static)
if(LLMPROXY_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${LLMPROXY_QEMU_AARCH64})
endif()

set(LLMPROXY_AARCH64_EXTRA_ROOT "" CACHE PATH
  "Directory with unpacked arm64 -dev packages that are not co-installable with amd64 ones")
# try_compile() projects read this file again: hand the setting on to them.
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES LLMPROXY_AARCH64_EXTRA_ROOT)

# Debian's multiarch layout: the arm64 libraries and their CMake packages live under
# /usr/lib/aarch64-linux-gnu of the host itself, so the host's / is the target's root. The root
# paths restrict library, header and package look-ups to them (with CMAKE_LIBRARY_ARCHITECTURE
# selecting lib/aarch64-linux-gnu) and keep them out of /usr/lib/x86_64-linux-gnu; programs
# (pkg-config, ccache) are the host's.
set(CMAKE_FIND_ROOT_PATH /)
if(LLMPROXY_AARCH64_EXTRA_ROOT)
  list(PREPEND CMAKE_FIND_ROOT_PATH ${LLMPROXY_AARCH64_EXTRA_ROOT})
endif()
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# The binaries must load their libraries from where an arm64 system has them (the loader's default
# /usr/lib/aarch64-linux-gnu), not from LLMPROXY_AARCH64_EXTRA_ROOT, which CMake would otherwise
# write into a build RUNPATH. The project links no shared library of its own.
set(CMAKE_SKIP_BUILD_RPATH ON)

# pkg-config (FindOpenSSL and FindPkgConfig users): only the arm64 .pc files, never the host's.
set(_llmproxy_pc_dirs /usr/lib/aarch64-linux-gnu/pkgconfig /usr/share/pkgconfig)
if(LLMPROXY_AARCH64_EXTRA_ROOT)
  list(PREPEND _llmproxy_pc_dirs ${LLMPROXY_AARCH64_EXTRA_ROOT}/usr/lib/aarch64-linux-gnu/pkgconfig)
endif()
string(REPLACE ";" ":" _llmproxy_pc_dirs "${_llmproxy_pc_dirs}")
set(ENV{PKG_CONFIG_LIBDIR} "${_llmproxy_pc_dirs}")
set(ENV{PKG_CONFIG_PATH} "")
unset(ENV{PKG_CONFIG_SYSROOT_DIR})
unset(_llmproxy_pc_dirs)
