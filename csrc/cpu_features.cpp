// CPU feature detection: which instruction-set paths this build has and this CPU (and OS) can
// run. Every architecture-specific construct is guarded, so the file compiles anywhere; a
// feature of another architecture is reported absent.
#include "tower.h"

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__linux__) && defined(__aarch64__)
#include <sys/auxv.h>
#endif

namespace srp4ctr {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return avx2_compiled() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#elif defined(__x86_64__) || defined(__i386__)
  // CPUID leaf 7 sub-leaf 1, EAX bit 5
  unsigned a = 7, b = 0, c = 1, d = 0;
  __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
  return cpu_has_avx512() && ((a >> 5) & 1u);
#else
  return false;
#endif
}

bool cpu_has_amx_bf16() {
#if defined(__linux__) && defined(__x86_64__)
  static const bool ok = [] {
    if (!amx_compiled() || !cpu_has_avx512_bf16()) return false;
    unsigned a = 7, b = 0, c = 0, d = 0;  // CPUID leaf 7 sub-leaf 0: EDX 22 AMX-BF16, 24 AMX-TILE
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;
    // Linux hands out the 8 KiB tile state only on request (once per process; inherited by fork)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

// Advanced SIMD (NEON) is part of every AArch64 CPU.
bool cpu_has_neon() { return neon_compiled(); }

bool cpu_has_neon_bf16() {
#if defined(__linux__) && defined(__aarch64__)
  constexpr unsigned long kHwcap2Bf16 = 1ul << 14;  // HWCAP2_BF16 (asm/hwcap.h)
  return neon_bf16_compiled() && (getauxval(AT_HWCAP2) & kHwcap2Bf16);
#else
  return false;
#endif
}

}  // namespace srp4ctr
