#!/usr/bin/env bash
# The C++ extension built with AddressSanitizer and UndefinedBehaviorSanitizer, and the tests of
# its Python boundary and kernels run against that build (the ASan runtime preloaded into
# Python): an out-of-bounds read or write, a use after free or undefined behaviour anywhere in
# csrc/ fails this script. Then the C++-only parity driver, sanitized too. A copy of the
# checkout is built, so the installed extension is left alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$work" 2>/dev/null ||
  tar -cf - --exclude=.git . | tar -xf - -C "$work"
(cd "$work" && SRP4CTR_SANITIZE=1 python setup.py -q build_ext --inplace >"$work/build.log" 2>&1) ||
  { tail -n 30 "$work/build.log"; exit 1; }
asan=$(${CXX:-g++} -print-file-name=libasan.so)
ubsan=$(${CXX:-g++} -print-file-name=libubsan.so)
# leaks: Python and torch keep allocations alive until exit, which is not an error of csrc/
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:handle_segv=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd "$work" && LD_PRELOAD="$asan $ubsan" PYTHONPATH="$work" SRP4CTR_REQUIRE_CPP=1 \
  python -m pytest -q -p no:cacheprovider tests/test_cpp_boundary.py tests/test_cpp.py 2>&1 |
  tail -n 3) | tee "$work/pytest.log"
grep -qE "[0-9]+ passed" "$work/pytest.log" && ! grep -qE "failed|error" "$work/pytest.log" ||
  { echo "sanitize: the tests failed under ASan/UBSan" >&2; exit 1; }
python -c "import sys; sys.path.insert(0, '$work'); import srp4ctr; assert srp4ctr.__file__.startswith('$work'), srp4ctr.__file__" ||
  { echo "sanitize: the sanitized build was not the one imported" >&2; exit 1; }
bash "$root/csrc/tests/arm_parity.sh" --sanitize
