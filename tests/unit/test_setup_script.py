"""scripts/setup.sh's run_long: a slow step that succeeds lets the script go on, one that fails
stops it with the step's log. (A killed ticker's exit status once ended setup.sh silently under
`set -e`, and CI with it, whenever pip ran longer than one tick.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

SETUP = Path(__file__).resolve().parents[2] / "scripts" / "setup.sh"


def _run_long(cmd: str) -> subprocess.CompletedProcess[str]:
    # The helper functions only, under the script's own shell options, with a 1 s tick.
    script = f"""
set -euo pipefail
eval "$(sed -n '/^run_quiet()/,/^}}/p; /^run_long()/,/^}}/p' {SETUP})"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
run_long "the step" "a moment" {cmd}
echo "AFTER THE STEP"
"""
    return subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "NYDUS_SETUP_TICK": "1"},
    )


def test_a_step_longer_than_a_tick_lets_the_script_go_on() -> None:
    r = _run_long("sleep 2.5")
    assert r.returncode == 0, r.stderr
    assert "AFTER THE STEP" in r.stdout
    assert "the step: 1 s" in r.stderr  # it ticked
    assert "the step: done in" in r.stderr


def test_a_failing_step_stops_the_script_with_its_log() -> None:
    r = _run_long("sh -c 'echo the-reason >&2; exit 3'")
    assert r.returncode != 0
    assert "AFTER THE STEP" not in r.stdout
    assert "FAILED: the step" in r.stderr
    assert "the-reason" in r.stderr
