#!/usr/bin/env bash
# The demo: build a Nydus (RAFS v6) image from a sample tree full of edge cases, check it,
# unpack it and compare with the source, and (as root) mount it with the kernel's EROFS.
#
#   bash scripts/demo.sh              # work dir is removed at the end
#   NYDUS_DEMO_KEEP=1 bash scripts/demo.sh    # keep the work dir to look around
#
# Exit status 0 only if every step that ran succeeded (the kernel step is skipped, not failed,
# when not root or the kernel has no EROFS).
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 1
py="$repo/.venv/bin/python"
nydus_image="$repo/.venv/bin/nydus-image"

work=$(mktemp -d "${TMPDIR:-/tmp}/nydus-demo.XXXXXX")
mnt="$work/mnt"
results=()
failed=0

cleanup() {
    if mountpoint -q "$mnt" 2>/dev/null; then
        "$py" -c 'import sys; from nydus.kernel_mount import umount; umount(sys.argv[1], lazy=True)' \
            "$mnt" || true
    fi
    if [[ ${NYDUS_DEMO_KEEP:-0} == 1 ]]; then
        echo "(work dir kept: $work)"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

if [[ -t 1 ]]; then bold=$'\033[1m' plain=$'\033[0m'; else bold="" plain=""; fi
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain"; }
say() { printf '    %s\n' "$*"; }
run() {  # echo a command, then run it with its output indented
    printf '    $ %s\n' "$*"
    "$@" 2>&1 | sed 's/^/      /'
    return "${PIPESTATUS[0]}"
}
record() {  # record NAME STATUS
    results+=("$(printf '%-28s %s' "$1" "$2")")
    [[ $2 == FAILED* ]] && failed=1
    return 0
}
human() { numfmt --to=iec-i --suffix=B "$1" 2>/dev/null || echo "$1 bytes"; }

step "1. Set up the machine (scripts/setup.sh: Debian packages, .venv, pip install -e)"
if bash scripts/setup.sh; then
    say "ok: $("$py" --version), work dir $work"
else
    echo "setup failed" >&2
    exit 1
fi

step "2. Generate a sample tree (tests/corpus.py make_tree, scale=small)"
src="$work/src"
PYTHONPATH="$repo/tests" "$py" - "$src" <<'EOF'
import os, sys
from pathlib import Path
from corpus import make_tree
info = make_tree(Path(sys.argv[1]), scale="small")
n = size = 0
for dirpath, dirnames, filenames in os.walk(info.root):
    n += len(dirnames) + len(filenames)
    size += sum(os.lstat(os.path.join(dirpath, f)).st_size for f in filenames)
print(f"    {n} entries, {size / 2**20:.1f} MiB of apparent file data")
cats = ", ".join(f"{k} {len(v)}" for k, v in sorted(info.paths.items()))
print(f"    edge cases: {cats}")
if info.skipped:
    print(f"    skipped (not root): {'; '.join(info.skipped)}")
EOF
mapfile -t socket_paths < <(cd "$src" && find . -type s -printf '%P\n')

step "3. Build the image: nydus-image create --compressor zstd"
img="$work/zstd"
start=$(date +%s%N)
if run "$nydus_image" create --bootstrap "$img/image.boot" --blob-dir "$img/blobs" \
    --compressor zstd "$src"; then
    ms=$((($(date +%s%N) - start) / 1000000))
    say "built in ${ms} ms: bootstrap $(human "$(stat -c %s "$img/image.boot")")"
    for b in "$img"/blobs/*; do
        [[ -e $b ]] && say "blob $(basename "$b"): $(human "$(stat -c %s "$b")")"
    done
    record "create (zstd)" ok
    built=1
else
    record "create (zstd)" FAILED
    built=0
fi

if ((built)); then
    step "4. Check it: nydus-image check (verifies every chunk digest in the blobs)"
    if run "$nydus_image" check "$img/image.boot" -D "$img/blobs"; then
        record "check" ok
    else
        record "check" FAILED
    fi

    step "5. Inspect it: nydus-image inspect -R stats"
    if "$nydus_image" inspect --help >/dev/null 2>&1; then
        if run "$nydus_image" inspect "$img/image.boot" -R stats; then
            record "inspect" ok
        else
            record "inspect" FAILED
        fi
    else
        say "nydus-image has no inspect command yet"
        record "inspect" "skipped (no command)"
    fi

    step "6. Unpack it to a tar, extract with GNU tar, compare with the source"
    out="$work/unpacked"
    mkdir -p "$out"
    if run "$nydus_image" unpack "$img/image.boot" --blob-dir "$img/blobs" \
        --output "$work/image.tar"; then
        say "tar: $(human "$(stat -c %s "$work/image.tar")")"
        run tar --extract --file "$work/image.tar" --directory "$out" --numeric-owner \
            --same-permissions --same-owner --xattrs --xattrs-include='*' --acls \
            --warning=no-timestamp --warning=no-unknown-keyword
        say "comparing (sockets excluded: tar cannot hold them): ${socket_paths[*]}"
        if PYTHONPATH="$repo/tests" "$py" - "$src" "$out" "${socket_paths[@]}" <<'EOF'; then
import sys
from treecmp import compare_trees
diffs = compare_trees(sys.argv[1], sys.argv[2], exclude=sys.argv[3:])
for line in diffs[:40]:
    print(f"      DIFF {line}")
if len(diffs) > 40:
    print(f"      ... and {len(diffs) - 40} more")
print(f"    {len(diffs)} differences (type, mode, owner, size, mtime ns, content, "
      "symlink, rdev, xattrs, hardlinks)")
sys.exit(1 if diffs else 0)
EOF
            record "unpack round trip" "ok (identical)"
        else
            record "unpack round trip" "FAILED (differences)"
        fi
    else
        record "unpack round trip" FAILED
    fi
fi

step "7. Mount with the kernel: EROFS, file-backed, blobs as device= (nydus.kernel_mount)"
if [[ $(id -u) -ne 0 ]]; then
    say "skipped: mount(2) needs root"
    record "kernel mount" "skipped (not root)"
elif ! grep -qw erofs /proc/filesystems; then
    say "skipped: this kernel has no EROFS"
    record "kernel mount" "skipped (no erofs)"
else
    raw="$work/none"
    say "The kernel reads uncompressed chunks straight from the blob, so build with --compressor none"
    if run "$nydus_image" create --bootstrap "$raw/image.boot" --blob-dir "$raw/blobs" \
        --compressor none "$src"; then
        mkdir -p "$mnt"
        if PYTHONPATH="$repo/tests" "$py" - "$raw/image.boot" "$raw/blobs" "$mnt" "$src" <<'EOF'
import os, subprocess, sys
from nydus.kernel_mount import mount_erofs, umount
from treecmp import compare_trees
boot, blob_dir, mnt, src = sys.argv[1:5]
try:  # device= order must follow the bootstrap's blob table
    from nydus.metadata import open_bootstrap
    devices = [os.path.join(blob_dir, b.blob_id) for b in open_bootstrap(boot).blobs]
except Exception as e:  # noqa: BLE001 - demo fallback
    print(f"    (blob table unreadable: {e}; using the blob dir listing)")
    devices = sorted(os.path.join(blob_dir, n) for n in os.listdir(blob_dir))
opts = ",".join(f"device={d}" for d in devices)
print(f"    $ mount(2) -t erofs -o ro,{opts} {boot} {mnt}")
mount_erofs(boot, mnt, devices)
try:
    print(f"    $ ls -la {mnt}")
    ls = subprocess.run(["ls", "-la", mnt], capture_output=True, text=True).stdout
    print("".join(f"      {line}\n" for line in ls.splitlines()), end="")
    with open(os.path.join(mnt, "sizes", "size-4097"), "rb") as f:
        print(f"    read sizes/size-4097 through the kernel: {len(f.read())} bytes")
    diffs = compare_trees(src, mnt)
    for line in diffs[:40]:
        print(f"      DIFF {line}")
    print(f"    {len(diffs)} differences between the source and the kernel mount")
finally:
    umount(mnt)
    print(f"    unmounted {mnt}")
sys.exit(1 if diffs else 0)
EOF
        then
            record "kernel mount" "ok (identical)"
        else
            record "kernel mount" FAILED
        fi
    else
        record "kernel mount" "FAILED (create --compressor none)"
    fi
fi

step "Summary"
for line in "${results[@]}"; do
    say "$line"
done
if ((failed)); then
    say "demo: some steps FAILED"
    exit 1
fi
say "demo: all steps passed"
