#!/usr/bin/env bash
# Idempotent set-up of a fresh machine for this project (Debian 12, run as root; CI does the same).
#
#   1. Debian packages the tests and tools need (apt-get update only when one is missing).
#   2. A virtualenv in <repo>/.venv made with the machine's python3 (>= 3.11).
#   3. `pip install -e '.[test,dev,bench]'`, skipped when pyproject.toml has not changed since the
#      last successful install (a stamp in .venv records its hash).
#
# Quiet when there is nothing to do; a step that has work to do says so on stderr with what it
# usually costs, and prints a line every 20 s while it runs (the first run on a fresh machine
# takes about 3 minutes: apt-get ~2 min, pip ~1 min). On failure it prints the log of the step
# that failed and exits non-zero.
# Environment: NYDUS_SETUP_FORCE=1 reinstalls the Python packages even if the stamp matches.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

log=$(mktemp -t nydus-setup.XXXXXX)
trap 'rm -f "$log"' EXIT

run_quiet() {  # run_quiet WHAT CMD...: run CMD with output to the log, show the log on failure
    local what=$1
    shift
    if ! "$@" >"$log" 2>&1; then
        echo "setup.sh: FAILED: $what" >&2
        echo "setup.sh: command: $*" >&2
        sed 's/^/    /' "$log" >&2
        exit 1
    fi
}

run_long() {  # run_long WHAT COST CMD...: run_quiet, saying what runs and that it still runs
    local what=$1 cost=$2 start=$SECONDS ticker rc=0
    shift 2
    echo "setup.sh: $what (usually $cost) ..." >&2
    (while sleep "${NYDUS_SETUP_TICK:-20}"; do echo "setup.sh:   ... $what: $((SECONDS - start)) s" >&2; done) &
    ticker=$!
    (run_quiet "$what" "$@") || rc=$?
    kill "$ticker" 2>/dev/null || true
    wait "$ticker" 2>/dev/null || true  # the killed ticker's 143 must not trip set -e
    ((rc == 0)) || exit "$rc"
    echo "setup.sh: $what: done in $((SECONDS - start)) s" >&2
}

# --- 1. Debian packages -------------------------------------------------------------------
# erofs-utils: mkfs.erofs/fsck.erofs (baseline builder, oracle); zstd: bench baseline;
# attr + acl: getfattr/setfattr/setfacl for the test corpus; fuse3: fusermount3 for the daemon;
# python3-venv: venv for Debian's python3; tar: unpack checks in the demo; time: bench RSS.
# iproute2: ip netns + tc for the bandwidth-limited link in bench/fetch.py.
apt_packages=(erofs-utils zstd attr acl fuse3 python3-venv tar time docker-registry skopeo apache2-utils openssl iproute2)
apt_packages+=(containerd runc busybox-static golang-github-containerd-containerd-dev golang-github-gogo-protobuf-dev)  # snapshotter: containerd e2e, .proto files
apt_packages+=(debootstrap curl)  # snapshotter: the Debian-based image of the slow e2e test, bench/coldstart.py and the demo; curl for the demo
missing=()
for p in "${apt_packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup.sh: missing Debian packages: ${missing[*]} (run as root to install them)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    run_long "apt-get update" "10-30 s" apt-get update -q
    run_long "apt-get install of ${#missing[@]} Debian packages" "1-3 min" \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- 2. virtualenv ------------------------------------------------------------------------
py_ok() {  # py_ok PYTHON: true if PYTHON runs and is >= 3.11
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}
python=""
for cand in python3 /usr/bin/python3; do
    if command -v "$cand" >/dev/null 2>&1 && py_ok "$cand"; then
        python=$(command -v "$cand")
        break
    fi
done
if [[ -z $python ]]; then
    echo "setup.sh: no python3 >= 3.11 found (tried python3 on PATH and /usr/bin/python3)" >&2
    exit 1
fi

venv="$repo/.venv"
if [[ -d $venv ]] && ! py_ok "$venv/bin/python"; then
    # A venv whose interpreter vanished (e.g. made on another machine): start again.
    rm -rf "$venv"
fi
if [[ ! -x $venv/bin/python ]]; then
    run_quiet "create virtualenv with $python" "$python" -m venv "$venv"
    # Keep the venv out of git without touching the project's .gitignore.
    printf '*\n' >"$venv/.gitignore"
fi

# --- 3. Python packages -------------------------------------------------------------------
stamp="$venv/.nydus-setup-stamp"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
if [[ $want != "$have" || ${NYDUS_SETUP_FORCE:-0} == 1 ]] \
    || ! "$venv/bin/python" -c 'import nydus, pytest' >/dev/null 2>&1; then
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
    run_long "pip install -e '.[test,dev,bench]' into .venv" "about 1 min" \
        "$venv/bin/python" -m pip install -q -e ".[test,dev,bench]"
    echo "$want" >"$stamp"
fi
run_quiet "generate containerd gRPC modules" "$venv/bin/python" -m nydus.snapshotter.containerd.protogen  # src/nydus/snapshotter/containerd/_api (git-ignored)
