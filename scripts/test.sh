#!/usr/bin/env bash
# Run the test suite: set up the machine (scripts/setup.sh), the static checks (scripts/lint.sh:
# ruff format --check, ruff check, mypy --strict), then pytest from the repo root.
#
#   bash scripts/test.sh                      # everything (kernel tests need root)
#   bash scripts/test.sh -m 'not slow'        # any pytest arguments pass through
#   bash scripts/test.sh tests/unit -x -q
#
# Exit status: pytest's, except that "no tests collected" (pytest exit 5) is a failure, and that
# failed static checks fail the run (after pytest has run, so both reports are seen).
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 1

bash scripts/setup.sh || { echo "test.sh: setup failed" >&2; exit 1; }
lint_rc=0
bash scripts/lint.sh || lint_rc=$?

start=$(date +%s)
.venv/bin/python -m pytest "$@"
rc=$?
elapsed=$(($(date +%s) - start))

case $rc in
    0) summary="all selected tests passed" ;;
    1) summary="some tests FAILED" ;;
    2) summary="test run INTERRUPTED" ;;
    3) summary="pytest INTERNAL ERROR" ;;
    4) summary="pytest USAGE ERROR (bad arguments?)" ;;
    5) summary="NO TESTS were collected: treated as failure" ;;
    *) summary="pytest exited with unexpected status $rc" ;;
esac
echo "test.sh: ${summary} (pytest exit ${rc}, ${elapsed}s, as $(id -un))"
if ((lint_rc != 0)); then
    echo "test.sh: static checks FAILED (bash scripts/lint.sh)"
    ((rc == 0 || rc == 5)) && rc=1
fi
if ((rc == 5)); then
    exit 1
fi
exit "$rc"
