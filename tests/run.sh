#!/usr/bin/env bash
# The project's test run: the whole suite on the installed package, then the Triton kernel tests
# again under the Triton CPU interpreter (TRITON_INTERPRET must be set before triton is imported,
# hence a second process) beside a one-round smoke run of the benchmark suites.
set -euo pipefail
cd "$(dirname "$0")/.."
# the C++ extension is part of the install: its tests fail (not skip) when it is missing
export SRP4CTR_REQUIRE_CPP=1
python -m pytest -q "$@"
# benchmark suites, one round each (they must not rot): beside the interpreter run
smoke_log=$(mktemp)
(out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
 python -m srp4ctr bench --smoke --out "$out" --timeout-s 300 | tail -n 8) >"$smoke_log" 2>&1 &
smoke=$!
if python -c "import triton" 2>/dev/null; then
  TRITON_INTERPRET=1 python -m pytest -q -m interpreter "$@"
else
  echo "triton is not installed: the interpreter run of the kernel tests cannot run" >&2
  exit 1
fi
status=0
wait "$smoke" || status=$?
cat "$smoke_log"
rm -f "$smoke_log"
exit "$status"
