#!/usr/bin/env bash
# The demo: a container starts from a Nydus image before the image is downloaded.
#
#   sudo bash scripts/demo.sh                  # the lazy-loading demo: about 30 s when set up
#                                              # and the Debian rootfs is cached; about 8.5 min
#                                              # on a fresh machine (setup ~3 min, debootstrap
#                                              # ~5 min), with a line every 20 s meanwhile
#   sudo bash scripts/demo.sh --format         # then the image-format round trip as well
#                                              # (build, check, unpack and compare a tree of
#                                              # edge cases: what this demo used to be)
#   NYDUS_DEMO_KEEP=1 bash scripts/demo.sh     # keep the work dir to look around
#   NYDUS_DEMO_IMAGE=busybox bash scripts/demo.sh  # a small image (no debootstrap, no network)
#   NYDUS_DEMO_CACHE=DIR bash scripts/demo.sh  # where the Debian rootfs tarball is cached
#   NYDUS_DEMO_PULL=nydus-pull bash scripts/demo.sh  # pull with nydus-pull, not stock ctr
#
# Everything runs on this machine, on its own sockets and ports: Debian's docker-registry on
# 127.0.0.1, Debian's containerd with the seed article's [proxy_plugins.nydus] snippet plus the
# README's content-store proxy, and our containerd-nydus-grpc started with the article's command
# line plus --content-store. The sample image is Debian 12 (debootstrap minbase + python3, perl,
# git, ...; the rootfs tarball is cached in /var/tmp/nydus-e2e), or busybox-static plus data
# files when debootstrap cannot run. It is pushed as an OCI image, converted by our nydusify,
# pulled lazily with stock `ctr image pull --snapshotter nydus` (or nydus-pull), and run with
# stock `ctr run --snapshotter nydus`; then the bytes nydusd fetched are compared with the image.
# Everything it started is stopped and unmounted on exit, also on errors and Ctrl-C.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 1
py="$repo/.venv/bin/python"
bin="$repo/.venv/bin"
format_too=0
[[ ${1:-} == --format ]] && format_too=1
pull_with=${NYDUS_DEMO_PULL:-ctr}
[[ $pull_with == ctr || $pull_with == nydus-pull ]] || { echo "NYDUS_DEMO_PULL: ctr or nydus-pull" >&2; exit 2; }

if [[ -t 1 ]]; then bold=$'\033[1m' plain=$'\033[0m'; else bold="" plain=""; fi
step() { printf '\n%s==> %s%s  (%ss)\n' "$bold" "$*" "$plain" "$SECONDS"; }
say() { printf '    %s\n' "$*"; }
run() {  # echo a command, then run it with its output indented
    printf '    $ %s\n' "$*"
    "$@" 2>&1 | sed 's/^/      /'
    return "${PIPESTATUS[0]}"
}
die() {
    echo "demo: FAILED: $*" >&2
    exit 1
}
ticking() {  # ticking WHAT CMD...: run CMD, printing "still WHAT" every 20 s until it ends
    local what=$1 start=$SECONDS ticker rc=0
    shift
    (while sleep 20; do printf '    ... still %s (%s s)\n' "$what" "$((SECONDS - start))"; done) &
    ticker=$!
    "$@" || rc=$?
    kill "$ticker" 2>/dev/null || true
    wait "$ticker" 2>/dev/null || true
    return "$rc"
}
mib() { awk -v b="$1" 'BEGIN { if (b < 1048576) printf "%.1f KiB", b / 1024; else printf "%.1f MiB", b / 1048576 }'; }
free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

[[ $(id -u) -eq 0 ]] || die "run as root: containerd, runc, FUSE and overlay mounts need it"

step "1. Set up the machine (scripts/setup.sh: Debian packages, .venv, pip install -e; ~3 min the first time)"
bash scripts/setup.sh || die "setup"
say "ok: $("$py" --version)"

work=$(mktemp -d /tmp/nydus-demo.XXXXXX)  # short: unix socket paths live here
ns="nydus-demo-$$"
pids=()
cleanup() {
    set +e
    if [[ -S $work/containerd.sock ]]; then  # containers first, while containerd runs
        for t in $(ctr -a "$work/containerd.sock" -n "$ns" tasks ls -q 2>/dev/null); do
            ctr -a "$work/containerd.sock" -n "$ns" tasks kill -s SIGKILL "$t" >/dev/null 2>&1
            sleep 0.5
            ctr -a "$work/containerd.sock" -n "$ns" tasks delete "$t" >/dev/null 2>&1
        done
        for c in $(ctr -a "$work/containerd.sock" -n "$ns" containers ls -q 2>/dev/null); do
            ctr -a "$work/containerd.sock" -n "$ns" containers delete "$c" >/dev/null 2>&1
        done
    fi
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do  # snapshotter, containerd, registry
        kill "${pids[i]}" 2>/dev/null && wait "${pids[i]}" 2>/dev/null
    done
    if [[ -f $work/root/daemons/state.json ]]; then  # nydusd outlives the snapshotter
        PYTHONPATH="$repo/tests" "$py" -c 'import sys; from pathlib import Path
from containerd import stop_recorded_daemons
for line in stop_recorded_daemons(Path(sys.argv[1])): print("    cleanup:", line)' "$work/root"
    fi
    grep -o " $work[^ ]*" /proc/self/mountinfo | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null
    done
    rmdir "/run/containerd/runc/$ns" 2>/dev/null
    if [[ ${NYDUS_DEMO_KEEP:-0} == 1 ]]; then
        echo "(work dir kept: $work)"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

reg_port=$(free_port)
metrics_port=$(free_port)
registry="127.0.0.1:$reg_port"

step "2. Start a registry: docker-registry on $registry"
cat >"$work/registry.yml" <<EOF
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: $registry, secret: nydus-demo}
EOF
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://$registry/v2/" >/dev/null && break; sleep 0.1; done
curl -sf "http://$registry/v2/" >/dev/null || die "registry did not start: $(tail -5 "$work/registry.log")"
say "ok"

step "3. Build a sample OCI image and push it"
image=${NYDUS_DEMO_IMAGE:-debian}
if [[ $image == debian ]]; then
    say "Debian 12: debootstrap --variant=minbase bookworm + python3, perl, git, curl, ..."
    say "(the rootfs tarball is cached in ${NYDUS_DEMO_CACHE:-/var/tmp/nydus-e2e}; the first run downloads ~100 MB of .debs"
    say " and runs debootstrap: about 5 minutes; cached, a few seconds)"
    if ! PYTHONPATH="$repo/tests" ticking "building the Debian rootfs" "$py" -c 'import sys; from pathlib import Path
from containerd import debian_layout
print("    rootfs:", debian_layout(Path(sys.argv[1]), "1", Path(sys.argv[2])), "bytes")' \
        "$work/layout" "${NYDUS_DEMO_CACHE:-/var/tmp/nydus-e2e}"; then
        say "debootstrap failed (no network?): using the busybox sample instead"
        image=busybox
    fi
fi
if [[ $image == busybox ]]; then
    say "busybox-static (Debian's) + 16 files of 512 KiB of random data"
    PYTHONPATH="$repo/tests" "$py" -c 'import sys; from pathlib import Path
from containerd import busybox_data_layout
busybox_data_layout(Path(sys.argv[1]), "1")' "$work/layout" || die "building the busybox image"
    workload='cat /etc/os-release; md5sum /data/f03'
else
    workload="head -n 2 /etc/os-release; python3 -c 'import json, sqlite3; print(\"python3 says\", json.dumps({\"sqlite\": sqlite3.sqlite_version}))'; git --version"
fi
run skopeo copy --quiet --dest-tls-verify=false "oci:$work/layout:1" "docker://$registry/demo:1" \
    || die "skopeo copy"
rm -rf "$work/layout"

step "4. Convert it to a Nydus image with our nydusify"
run "$bin/nydusify" convert --plain-http --work-dir "$work/convert" \
    --source "$registry/demo:1" --target "$registry/demo:1-nydus" || die "nydusify convert"
rm -rf "$work/convert"
read -r oci_bytes nydus_blob_bytes nydus_meta_bytes < <("$py" - "$registry" <<'EOF'
import json, sys, urllib.request
def get(path):
    req = urllib.request.Request(f"http://{sys.argv[1]}/v2/demo/manifests/{path}", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req) as r:
        return r.read()
oci, nyd = get("1"), get("1-nydus")
o, n = json.loads(oci), json.loads(nyd)
blob = "application/vnd.oci.image.layer.nydus.blob.v1"
print(len(oci) + o["config"]["size"] + sum(x["size"] for x in o["layers"]),
      sum(x["size"] for x in n["layers"] if x["mediaType"] == blob),
      len(nyd) + n["config"]["size"] + sum(x["size"] for x in n["layers"] if x["mediaType"] != blob))
EOF
)
say "OCI image $(mib "$oci_bytes"); Nydus image: data blobs $(mib "$nydus_blob_bytes"), manifest + config + bootstrap $(mib "$nydus_meta_bytes")"

step "5. Start the snapshotter (the seed article's command line + --content-store) and containerd"
cat >"$work/config.json" <<'EOF'
{
  "device": {
    "backend": {
      "type": "registry",
      "config": {"scheme": "http", "skip_verify": false, "timeout": 5, "connect_timeout": 5,
                 "retry_limit": 2, "auth": ""}
    },
    "cache": {"type": "blobcache", "config": {"work_dir": "cache"}}
  },
  "mode": "direct",
  "digest_validate": false,
  "iostats_files": false,
  "enable_xattr": true,
  "fs_prefetch": {"enable": false, "threads_count": 4}
}
EOF
say "/etc/nydus/config.json of the article, with fs_prefetch off (on, nydusd would fetch the"
say "whole image in the background, and the bytes below would say nothing about lazy loading)"
printf '    $ containerd-nydus-grpc --config-path %s --shared-daemon --log-level info \\\n' "$work/config.json"
printf '        --root %s --cache-dir %s --address %s \\\n' "$work/root" "$work/cache" "$work/nydus.sock"
printf '        --nydusd-path %s --nydusimg-path %s --log-to-stdout --metrics-address 127.0.0.1:%s \\\n' \
    "$bin/nydusd" "$bin/nydus-image" "$metrics_port"
printf '        --content-store\n'
"$bin/containerd-nydus-grpc" --config-path "$work/config.json" --shared-daemon --log-level info \
    --root "$work/root" --cache-dir "$work/cache" --address "$work/nydus.sock" \
    --nydusd-path "$bin/nydusd" --nydusimg-path "$bin/nydus-image" --log-to-stdout \
    --containerd-address "$work/containerd.sock" --metrics-address "127.0.0.1:$metrics_port" \
    --content-store >"$work/snapshotter.log" 2>&1 &
pids+=($!)
say "containerd: the article's [proxy_plugins.nydus] and the README's content-store proxy"
say "(version 2 config; containerd's own content plugin disabled, so its content store is ours)"
cat >"$work/containerd.toml" <<EOF
version = 2
root = "$work/containerd"
state = "$work/containerd-state"
disabled_plugins = ["io.containerd.content.v1.content", "io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd.sock"
[ttrpc]
  address = "$work/containerd.sock.ttrpc"

[proxy_plugins]
  [proxy_plugins.nydus]
    type = "snapshot"
    address = "$work/nydus.sock"
  [proxy_plugins.nydus-content]
    type = "content"
    address = "$work/nydus.sock"
EOF
containerd --config "$work/containerd.toml" >"$work/containerd.log" 2>&1 &
pids+=($!)
ctr_() { ctr -a "$work/containerd.sock" -n "$ns" "$@"; }
for _ in $(seq 150); do ctr_ snapshots --snapshotter nydus ls >/dev/null 2>&1 && break; sleep 0.2; done
ctr_ snapshots --snapshotter nydus ls >/dev/null 2>&1 \
    || die "containerd cannot reach the snapshotter: $(tail -5 "$work/snapshotter.log" "$work/containerd.log")"
run ctr -a "$work/containerd.sock" plugins ls | grep -E 'nydus|PLATFORMS'

ref="$registry/demo:1-nydus"
t0=$(date +%s.%N)
if [[ $pull_with == ctr ]]; then
    step "6. Pull it lazily: stock ctr image pull --snapshotter nydus"
    printf '    $ ctr image pull --plain-http --snapshotter nydus %s\n' "$ref"
    ctr_ image pull --plain-http --snapshotter nydus "$ref" 2>&1 | tail -n 3 | sed 's/^/      /'
    [[ ${PIPESTATUS[0]} -eq 0 ]] || die "ctr image pull: $(tail -20 "$work/snapshotter.log")"
else
    step "6. Pull it lazily: nydus-pull (a labelled pull over containerd's API)"
    run "$bin/nydus-pull" -q -a "$work/containerd.sock" -n "$ns" --plain-http "$ref" || die "nydus-pull"
fi
t1=$(date +%s.%N)
lazy=$(find "$work/root/content/lazy" -type f 2>/dev/null | wc -l)
say "pulled in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s: only the bootstrap layer was downloaded"
[[ $pull_with == ctr ]] && say "($lazy Nydus data blob(s) recorded by the content store as lazy entries, not downloaded)"

step "7. Run a container from it: stock ctr run --snapshotter nydus"
printf '    $ ctr run --snapshotter nydus %s demo sh -c "%s"\n' "$ref" "$workload"
ctr_ run --snapshotter nydus "$ref" demo /bin/sh -c "$workload" 2>&1 | sed 's/^/      /'
[[ ${PIPESTATUS[0]} -eq 0 ]] || die "ctr run: $(tail -20 "$work/snapshotter.log")"
t2=$(date +%s.%N)
say "pull + run: $(awk -v a="$t0" -v b="$t2" 'BEGIN { printf "%.2f", b - a }') s"

step "8. What was downloaded (the snapshotter's Prometheus endpoint, http://127.0.0.1:$metrics_port/metrics)"
curl -s "http://127.0.0.1:$metrics_port/metrics" | grep -E '^nydus_snapshotter_(image_fetch|image_read|daemons|cache_bytes)' \
    | sed 's/^/      /'
fetched=$(curl -s "http://127.0.0.1:$metrics_port/metrics" \
    | awk '/^nydus_snapshotter_image_fetch_bytes/ { s += $NF } END { print s + 0 }')
total=$((fetched + nydus_meta_bytes))
say "image size:     $(mib "$oci_bytes") as an OCI image (what ctr image pull would download)"
say "                $(mib "$((nydus_blob_bytes + nydus_meta_bytes))") as a Nydus image"
say "downloaded:     $(mib "$total") = pull $(mib "$nydus_meta_bytes") + fetched by nydusd $(mib "$fetched")"
say "                $(awk -v a="$total" -v b="$oci_bytes" 'BEGIN { printf "%.1f%%", 100 * a / b }') of the OCI image's bytes"
ctr_ containers delete demo >/dev/null 2>&1

if ((format_too)); then
    step "9. The image format: build a sample tree full of edge cases, check, unpack, compare"
    src="$work/src"
    PYTHONPATH="$repo/tests" "$py" -c 'import sys; from pathlib import Path
from corpus import make_tree
make_tree(Path(sys.argv[1]), scale="small")' "$src" || die "sample tree"
    mapfile -t socket_paths < <(cd "$src" && find . -type s -printf '%P\n')
    run "$bin/nydus-image" create --bootstrap "$work/fmt/image.boot" --blob-dir "$work/fmt/blobs" \
        --compressor zstd "$src" || die "nydus-image create"
    run "$bin/nydus-image" check "$work/fmt/image.boot" -D "$work/fmt/blobs" || die "nydus-image check"
    run "$bin/nydus-image" unpack "$work/fmt/image.boot" --blob-dir "$work/fmt/blobs" \
        --output "$work/fmt/image.tar" || die "nydus-image unpack"
    mkdir -p "$work/fmt/out"
    tar --extract --file "$work/fmt/image.tar" --directory "$work/fmt/out" --numeric-owner \
        --same-permissions --same-owner --xattrs --xattrs-include='*' --acls \
        --warning=no-timestamp --warning=no-unknown-keyword
    PYTHONPATH="$repo/tests" "$py" - "$src" "$work/fmt/out" "${socket_paths[@]}" <<'PYEOF' \
        || die "the unpacked tree differs from the source"
import sys
from treecmp import compare_trees
diffs = compare_trees(sys.argv[1], sys.argv[2], exclude=sys.argv[3:])
for line in diffs[:40]:
    print(f"      DIFF {line}")
print(f"    {len(diffs)} differences (type, mode, owner, size, mtime ns, content, symlink, rdev, "
      "xattrs, hardlinks; sockets excluded: tar cannot hold them)")
sys.exit(1 if diffs else 0)
PYEOF
fi

step "Done"
say "demo: a container ran from $(mib "$oci_bytes") of image after $(mib "$total") of downloads"
