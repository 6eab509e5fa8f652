// Which clone of the DDPM_FAST_VECTOR_CLONES kernels (common/loops.h) this CPU runs, for reports,
// CI's log and tests/test_cpu_dispatch.py: a function multiversioned on the same targets, so that
// GCC's resolver (the same libgcc feature bits, in the same priority order) makes the same choice
// for it as for the kernels. Plain C, read with ctypes (ddpm_fast/_extension.py): not an op.
#include "loops.h"

namespace ddpm_fast {

// Not in an anonymous namespace, and called from C++ (cpu_vector_clone), not straight from the
// extern "C" function: GCC 12 otherwise emits the versions' shared symbol twice.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target(DDPM_FAST_CLONE_V4))) const char* vector_clone() { return "x86-64-v4"; }
__attribute__((target(DDPM_FAST_CLONE_V3))) const char* vector_clone() { return "x86-64-v3"; }
__attribute__((target("default"))) const char* vector_clone() { return "default"; }
#else
const char* vector_clone() { return "none"; }  // no clones: not an x86-64 GCC build
#endif

const char* cpu_vector_clone() { return vector_clone(); }

}  // namespace ddpm_fast

extern "C" __attribute__((visibility("default"))) const char* ddpm_fast_cpu_vector_clone() {
  return ddpm_fast::cpu_vector_clone();
}
