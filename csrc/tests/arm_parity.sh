#!/usr/bin/env bash
# The NEON path against the portable one on aarch64, without Python and without an Arm machine:
# cross-compiles csrc/tests/parity_driver.cpp with the extension's C++ sources (static, so no
# aarch64 sysroot is needed at run time) and runs it under qemu-aarch64 user-mode emulation, on
# an emulated CPU with FEAT_BF16 (-cpu max: the BFDOT kernels) and one without (-cpu cortex-a72:
# bf16 as a storage format). Prints one line; on a mismatch the driver's report and exit 1.
# Installs the cross compiler and qemu with apt-get when they are missing.
#
#   bash csrc/tests/arm_parity.sh            the aarch64 check under qemu
#   bash csrc/tests/arm_parity.sh --native   the same driver built for this machine (x86: AVX2,
#                                            AVX-512, AMX against generic, whichever the CPU has)
#   bash csrc/tests/arm_parity.sh --sanitize the native driver built with AddressSanitizer and
#                                            UndefinedBehaviorSanitizer: any out-of-bounds read or
#                                            write, use after free or undefined behaviour fails
set -euo pipefail
cd "$(dirname "$0")/../.."
srcs=(csrc/tests/parity_driver.cpp csrc/model.cpp csrc/cpu_features.cpp csrc/threadpool.cpp
      csrc/tower_generic.cpp csrc/tower_avx2.cpp csrc/tower_avx512.cpp csrc/tower_neon.cpp)
native=0
opt=(-O2)
san=()
[[ "${1:-}" == "--native" ]] && native=1
if [[ "${1:-}" == "--sanitize" ]]; then
  native=1
  opt=(-O1 -g -fno-omit-frame-pointer)
  san=(-fsanitize=address,undefined -fno-sanitize-recover=all)
  export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
  export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
fi
[[ $(uname -m) == aarch64 ]] && native=1  # on an Arm machine the NEON path runs as it is
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ((native)); then
  cxx=${CXX:-g++}
else
  cxx=aarch64-linux-gnu-g++
  need=()
  command -v "$cxx" >/dev/null || need+=(g++-aarch64-linux-gnu)
  command -v qemu-aarch64-static >/dev/null || command -v qemu-aarch64 >/dev/null ||
    need+=(qemu-user-static)
  if ((${#need[@]})); then
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo=sudo
    echo "arm_parity: installing ${need[*]}" >&2
    $sudo apt-get update -qq >/dev/null
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  qemu=$(command -v qemu-aarch64-static || command -v qemu-aarch64)
fi

# one object per source, compiled in parallel
pids=()
for s in "${srcs[@]}"; do
  "$cxx" "${opt[@]}" "${san[@]}" -std=c++17 -fno-math-errno -Icsrc -c "$s" \
    -o "$work/$(basename "$s" .cpp).o" &
  pids+=($!)
done
py=$(command -v python || command -v python3 || true)
if ((!native)) && [[ -n $py ]] && inc=$("$py" -c "import pybind11, sysconfig
print(pybind11.get_include(), sysconfig.get_paths()['include'])" 2>/dev/null); then
  # the bindings must compile for aarch64 too (their x86-only code guarded): a syntax check
  read -r pybind python_inc <<<"$inc"
  "$cxx" -std=c++17 -fsyntax-only -Icsrc -I"$pybind" -I"$python_inc" csrc/module.cpp &
  pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p"; done
objs=("$work"/*.o)

if ((native)); then
  "$cxx" "${san[@]}" -pthread "${objs[@]}" -o "$work/parity"
  "$work/parity" >"$work/log" 2>&1 || { cat "$work/log"; exit 1; }
  echo "native ($(uname -m))${san:+, ASan + UBSan}: $(tail -n 1 "$work/log")"
  exit 0
fi

run=("$qemu")
if ! "$cxx" -static -pthread "${objs[@]}" -o "$work/parity" 2>"$work/link.log"; then
  # no static libraries: link against the cross toolchain's shared ones and point qemu at them
  "$cxx" -pthread "${objs[@]}" -o "$work/parity"
  run+=(-L /usr/aarch64-linux-gnu)
fi
line="aarch64 under qemu:"
for cpu in max cortex-a72; do
  "${run[@]}" -cpu "$cpu" "$work/parity" >"$work/log.$cpu" || { cat "$work/log.$cpu"; exit 1; }
  line+=" [-cpu $cpu] $(tail -n 1 "$work/log.$cpu")"
done
echo "$line"
