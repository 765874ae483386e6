#!/usr/bin/env bash
# The static checks CI runs before the tests: ruff format --check, ruff check, mypy --strict.
#
#   bash scripts/lint.sh          # check (exit 1 on the first tool that complains)
#   bash scripts/lint.sh --fix    # apply ruff format and ruff check's safe fixes first
#
# Uses the tools in .venv (scripts/setup.sh installs them with the dev extra).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
paths=(src tests bench fuzz)
ruff=.venv/bin/ruff

if [[ ${1:-} == --fix ]]; then
    "$ruff" format -q "${paths[@]}"
    "$ruff" check -q --fix "${paths[@]}"
fi
"$ruff" format --check -q "${paths[@]}" || {
    echo "lint.sh: files above need 'ruff format' (bash scripts/lint.sh --fix)" >&2
    exit 1
}
"$ruff" check -q "${paths[@]}"
.venv/bin/mypy
