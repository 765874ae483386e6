"""End to end: nydusify → registry → ``nydus-pull`` → stock ``ctr run --snapshotter nydus``.

Real components: Debian's containerd 1.6 and runc (started by the harness with their own root,
state and socket, and the seed article's ``[proxy_plugins.nydus]`` snippet), Debian's
docker-registry, ``containerd-nydus-grpc`` as a subprocess with the real daemon manager, which
starts our ``nydusd`` processes. The image is built here from Debian's busybox-static plus a
layer of incompressible data files, pushed with skopeo and converted by our ``nydusify``. All
registry traffic goes through a counting proxy, so the tests measure what lazy loading fetched.

Covered: the lazy pull and run in dedicated and shared mode (output checked, bytes measured,
metrics endpoint, cache GC after the image is removed), a plain OCI image through the same
snapshotter, a snapshotter restart under a running container (the container keeps reading, the
daemons are adopted, a new container starts), SIGKILL of the image's nydusd (restored; with
``--recover-policy failover`` the running container keeps reading too), and, marked slow, the
Debian-based image (debootstrap minbase + python3, cached in /var/tmp/nydus-e2e).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from test_merge import unpack_for_overlay

from containerd import ARTICLE_NYDUSD_CONFIG as ARTICLE_CONFIG
from containerd import (
    PATH_ENV,
    NydusStack,
    busybox_data_layout,
    containerd_skip_reason,
    debian_layout,
    nydus_pull,
    nydusify_convert,
    skopeo_push,
)
from nydus.snapshotter.containerd.proto import CONTENT_SERVICE, NAMESPACE_HEADER, content_pb2
from nydus.snapshotter.containerd.rpc import ServiceClient
from registry import FaultProxy, RegistryServer, free_port, registry_plain  # noqa: F401
from treecmp import compare_trees

pytestmark = [
    pytest.mark.skipif(containerd_skip_reason() is not None, reason=str(containerd_skip_reason())),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

OS_RELEASE = 'NAME="nydus-py test busybox"\nID=busybox\n'
HELLO = "hello from layer 2\n"
NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@dataclass
class Image:
    """An OCI image in the registry and its Nydus conversion."""

    oci: str  # repo:tag
    nydus: str  # repo:tag
    blobs: dict[str, int]  # Nydus data blob digest -> size
    bootstrap: tuple[str, int]  # bootstrap layer digest, size
    data: dict[str, bytes]

    @property
    def blob_total(self) -> int:
        return sum(self.blobs.values())


def _nydus_layers(
    registry: RegistryServer, repo_tag: str
) -> tuple[dict[str, int], tuple[str, int]]:
    repo, tag = repo_tag.rsplit(":", 1)
    body, _, _ = registry.client().get_manifest(repo, tag)
    doc = json.loads(body)
    blobs = {ly["digest"]: ly["size"] for ly in doc["layers"] if ly["mediaType"] == NYDUS_BLOB}
    boot = doc["layers"][-1]
    assert boot["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true"
    return blobs, (boot["digest"], boot["size"])


@pytest.fixture(scope="module")
def bb(registry_plain: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Image:  # noqa: F811
    """busybox-static + 16 incompressible 512 KiB files, converted by our nydusify."""
    work = tmp_path_factory.mktemp("bbdata")
    data = busybox_data_layout(work / "layout", "1")
    skopeo_push(work / "layout", "1", f"{registry_plain.host}/bbdata:1")
    nydusify_convert(
        f"{registry_plain.host}/bbdata:1", f"{registry_plain.host}/bbdata:1-nydus", work / "conv"
    )
    blobs, boot = _nydus_layers(registry_plain, "bbdata:1-nydus")
    assert len(blobs) == 3
    return Image("bbdata:1", "bbdata:1-nydus", blobs, boot, data)


@pytest.fixture
def proxy(registry_plain: RegistryServer) -> Iterator[FaultProxy]:  # noqa: F811
    p = FaultProxy(registry_plain)
    yield p
    p.stop()


MODES = {"dedicated": [], "shared": ["--shared-daemon"]}


StartStack = Callable[..., NydusStack]


@pytest.fixture
def stack(
    tmp_path: Path, report_on_failure: Callable[[Callable[[], str]], None]
) -> Iterator[StartStack]:
    """``stack(*snapshotter_args, content_store=False, log_level="debug")`` starts a
    :class:`NydusStack` in ``tmp_path``; a failed test's report gets its diagnostics, and at
    teardown it is stopped: the snapshotter must exit 0."""
    started: list[NydusStack] = []

    def start(*args: str, content_store: bool = False, log_level: str = "debug") -> NydusStack:
        s = NydusStack(tmp_path, ["--log-level", log_level, *args], content_store=content_store)
        started.append(s)
        report_on_failure(s.diagnostics)
        return s.start()

    yield start
    for s in started:
        rc = s.stop()
        assert rc == 0, f"snapshotter exit status {rc}\n{s.diagnostics()}"


def _fetched(proxy: FaultProxy, img: Image) -> int:
    return sum(proxy.blob_bytes(d) for d in img.blobs)


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _cache_files(s: NydusStack) -> list[str]:
    return sorted(p.name for p in s.cache_dir.glob("*.blob.*"))


# -- the lazy pull and run ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(MODES))
def test_lazy_pull_and_run(mode: str, bb: Image, proxy: FaultProxy, stack: StartStack) -> None:
    port = free_port()
    s = stack(*MODES[mode], "--metrics-address", f"127.0.0.1:{port}")
    ref = f"{proxy.host}/{bb.nydus}"
    res = nydus_pull(s.ctd, ref)
    assert len(res["skipped"]) == 3 and len(res["applied"]) == 1, res
    assert _fetched(proxy, bb) == 0, "the pull downloaded data blobs"
    assert proxy.blob_bytes(bb.bootstrap[0]) == bb.bootstrap[1]

    fetched = _run_lazily(s, ref, bb, proxy)

    # c1 is gone (--rm; containerd's GC then removes its snapshot): the image is released,
    # a dedicated daemon stops with it, the shared one stays
    wait_for(lambda: _scrape(port)["nydus_snapshotter_images"] == 0, what="image released")
    if mode == "shared":
        assert list(s.daemon_pids()) == ["shared"]
    else:
        wait_for(lambda: s.daemon_pids() == {}, what="dedicated daemon stopped")
    m = _scrape(port)
    assert m[f'nydus_snapshotter_daemons{{mode="{mode}"}}'] == (1 if mode == "shared" else 0)
    assert m["nydus_snapshotter_images"] == 0

    # a running container: the daemon serves it, metrics show the image's fetch bytes
    s.ctr("run", "-d", "--snapshotter", "nydus", ref, "long", "/bin/sleep", "600").check()
    r = s.ctr("tasks", "exec", "--exec-id", "e1", "long", "/bin/sh", "-c", "md5sum /data/f03")
    assert r.check().stdout == f"{md5(bb.data['data/f03'])}  /data/f03\n"
    assert _fetched(proxy, bb) == fetched, "cached data was fetched again"
    m = _scrape(port)
    ((key, value),) = [
        (k, v) for k, v in m.items() if k.startswith("nydus_snapshotter_image_fetch_bytes")
    ]
    assert f'image_ref="{ref}"' in key and value == 0  # a new daemon, all from the cache
    assert m[f'nydus_snapshotter_daemons{{mode="{mode}"}}'] == 1
    assert m["nydus_snapshotter_cache_bytes"] >= fetched // 2
    assert m["nydus_snapshotter_images"] == 1

    _remove_container(s, "long")
    # the last container is gone: the dedicated daemon stops; the shared one stays, empty
    if mode == "dedicated":
        wait_for(lambda: s.daemon_pids() == {}, what="dedicated daemon stopped")
    else:
        assert list(s.daemon_pids()) == ["shared"]
    assert _cache_files(s), "nothing in the cache"
    # removing the image lets containerd remove its snapshots: the cache is collected
    _remove_image(s, ref)
    wait_for(lambda: _cache_files(s) == [], what="cache files of unused blobs deleted")


def test_plain_oci_image_through_same_snapshotter(
    bb: Image, proxy: FaultProxy, stack: StartStack
) -> None:
    s = stack()
    ref = f"{proxy.host}/{bb.oci}"
    s.ctr("image", "pull", "--plain-http", "--snapshotter", "nydus", ref).check()
    r = s.run(ref, "p1", "/bin/sh", "-c", "cat /etc/os-release; md5sum /data/f01")
    assert r.returncode == 0, r.stderr
    assert r.stdout == OS_RELEASE + f"{md5(bb.data['data/f01'])}  /data/f01\n"
    assert s.daemon_pids() == {} and daemon_free(s)


def _run_lazily(s: NydusStack, ref: str, bb: Image, proxy: FaultProxy) -> int:
    """A container reading one data file; returns the blob bytes fetched so far, checked to be
    a small part of the image."""
    r = s.run(ref, "c1", "/bin/sh", "-c", "cat /etc/os-release; md5sum /data/f03")
    assert r.returncode == 0, r.stderr
    assert r.stdout == OS_RELEASE + f"{md5(bb.data['data/f03'])}  /data/f03\n"
    fetched = _fetched(proxy, bb)
    # busybox (about 1 MiB) and one 512 KiB file of a 9.5 MiB image
    assert 0 < fetched < 0.3 * bb.blob_total, (fetched, bb.blob_total)
    return fetched


def _remove_image(s: NydusStack, ref: str) -> None:
    """``ctr image rm --sync``: containerd's GC then removes the image's snapshots."""
    s.ctr("image", "rm", "--sync", ref).check()
    wait_for(
        lambda: s.ctr("snapshots", "--snapshotter", "nydus", "ls").stdout.count("\n") <= 1,
        what="snapshots removed",
    )


def _remove_container(s: NydusStack, cid: str) -> None:
    s.ctr("tasks", "kill", "-s", "SIGKILL", cid)  # it may have died already

    def deleted() -> bool:
        r = s.ctr("tasks", "delete", cid)
        return r.returncode == 0 or "not found" in r.stderr

    wait_for(deleted, what=f"task {cid} deleted")
    s.ctr("containers", "delete", cid).check()
    collect_garbage(s)


def collect_garbage(s: NydusStack) -> None:
    """Make containerd remove the deleted snapshot from the snapshotter now. Its GC runs on
    its own schedule and skips a deletion it thinks a collection in progress covered; a lease
    deleted with --sync runs one collection synchronously."""
    lease = s.ctr("leases", "create").check().stdout.strip()
    s.ctr("leases", "delete", "--sync", lease).check()


def daemon_free(s: NydusStack) -> bool:
    return not list((s.sn_root / "mnt").glob("*/*"))


def test_article_config_and_flags(
    bb: Image, proxy: FaultProxy, tmp_path: Path, stack: StartStack
) -> None:
    """Section 06 as written: its config.json and its flags (paths moved under tmp_path)."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(ARTICLE_CONFIG, indent=2))
    s = stack(
        "--config-path", str(cfg), "--shared-daemon",
        "--nydusd-path", "/usr/local/bin/nydusd", "--nydusimg-path", "/usr/local/bin/nydus-image",
        log_level="info",
    )  # fmt: skip
    ref = f"{proxy.host}/{bb.nydus}"
    nydus_pull(s.ctd, ref)
    # The container idles for 3 s after its reads: prefetch waits while a user read waits on
    # the backend and uses the link when users do not, and the image is detached (its
    # prefetch stopped) when the container is gone.
    cmd = "cat /etc/os-release; md5sum /data/f11; sleep 3"
    r = s.run(ref, "a1", "/bin/sh", "-c", cmd)
    assert r.returncode == 0, r.stderr
    assert r.stdout == OS_RELEASE + f"{md5(bb.data['data/f11'])}  /data/f11\n"
    assert list(s.daemon_pids()) == ["shared"]
    # fs_prefetch is on in the article's config: the daemon fetched the rest in the
    # background while the container idled, so (all but the blobs' trailers) the whole image
    wait_for(lambda: _fetched(proxy, bb) > 0.9 * bb.blob_total, 60, "background prefetch")


# -- lifecycle ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(MODES))
def test_snapshotter_restart_while_container_runs(
    mode: str, bb: Image, proxy: FaultProxy, stack: StartStack
) -> None:
    s = stack(*MODES[mode])
    ref = f"{proxy.host}/{bb.nydus}"
    nydus_pull(s.ctd, ref)
    s.ctr("run", "-d", "--snapshotter", "nydus", ref, "long", "/bin/sleep", "600").check()
    before = s.daemon_pids()
    assert len(before) == 1
    s.restart_snapshotter()
    # the running container reads files it never read before: the daemon still serves it
    r = s.ctr("tasks", "exec", "--exec-id", "e1", "long", "/bin/sh", "-c", "md5sum /data/f05")
    assert r.check().stdout == f"{md5(bb.data['data/f05'])}  /data/f05\n"
    assert s.daemon_pids() == before, "daemons were not adopted"
    assert "adopted running nydusd" in s.sn.log_text()
    # a new container from the same image starts after the restart
    r = s.run(ref, "after", "/bin/cat", "/etc/hello.txt")
    assert r.returncode == 0 and r.stdout == HELLO, r.stderr
    _remove_container(s, "long")
    if mode == "dedicated":
        wait_for(lambda: s.daemon_pids() == {}, what="daemon stopped after the restart")


@pytest.mark.parametrize(
    "mode,policy",
    [("dedicated", "restart"), ("dedicated", "failover"), ("shared", "restart")],
)
def test_sigkill_of_nydusd_is_restored(
    mode: str, policy: str, bb: Image, proxy: FaultProxy, stack: StartStack
) -> None:
    s = stack(*MODES[mode], "--recover-policy", policy)
    ref = f"{proxy.host}/{bb.nydus}"
    nydus_pull(s.ctd, ref)
    s.ctr("run", "-d", "--snapshotter", "nydus", ref, "long", "/bin/sleep", "600").check()
    ((did, pid),) = s.daemon_pids().items()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: s.daemon_pids().get(did, pid) != pid, what="nydusd restored")
    # new containers start
    r = s.run(ref, "n1", "/bin/sh", "-c", "md5sum /data/f07")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{md5(bb.data['data/f07'])}  /data/f07\n"
    # the running container: with failover its FUSE connection survived the crash
    r = s.ctr("tasks", "exec", "--exec-id", "e2", "long", "/bin/sh", "-c", "md5sum /data/f09")
    if policy == "failover":
        assert r.check().stdout == f"{md5(bb.data['data/f09'])}  /data/f09\n"
        assert "restored by failover" in s.sn.log_text()
    else:
        # restart: a new daemon, a new FUSE connection; the old one is gone for good, and
        # with it the running container (its /bin/sleep was paged in through it: SIGBUS)
        assert r.returncode != 0
        assert "restored by restart" in s.sn.log_text()
    _remove_container(s, "long")


def test_dead_daemon_restored_when_the_snapshotter_starts(
    bb: Image, proxy: FaultProxy, stack: StartStack
) -> None:
    """Snapshotter down, its daemon killed meanwhile: the next start restores it."""
    s = stack()
    ref = f"{proxy.host}/{bb.nydus}"
    nydus_pull(s.ctd, ref)
    s.ctr("run", "-d", "--snapshotter", "nydus", ref, "long", "/bin/sleep", "600").check()
    ((did, pid),) = s.daemon_pids().items()
    assert s.sn.stop() == 0
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: did not in s.daemon_pids(), what="nydusd gone")
    s.sn.start()
    s.ctd.wait_snapshotter(30)
    assert s.daemon_pids()[did] != pid
    r = s.run(ref, "n2", "/bin/cat", "/etc/hello.txt")
    assert r.returncode == 0 and r.stdout == HELLO, r.stderr


# -- the Debian-based image --------------------------------------------------------------------


@pytest.mark.slow
def test_debian_image_lazy(
    registry_plain: RegistryServer,  # noqa: F811
    proxy: FaultProxy,
    tmp_path: Path,
    stack: StartStack,
) -> None:
    size = debian_layout(tmp_path / "layout", "1")
    skopeo_push(tmp_path / "layout", "1", f"{registry_plain.host}/debian:12")
    nydusify_convert(
        f"{registry_plain.host}/debian:12", f"{registry_plain.host}/debian:12-nydus",
        tmp_path / "conv",
    )  # fmt: skip
    blobs, _ = _nydus_layers(registry_plain, "debian:12-nydus")
    total = sum(blobs.values())
    s = stack()
    ref = f"{proxy.host}/debian:12-nydus"
    nydus_pull(s.ctd, ref)
    script = (
        "cat /etc/os-release; "
        "python3 -c 'import json, sys; print(json.dumps({\"py\": sys.version_info[:2]}))'; "
        "ls /usr/bin | wc -l"
    )
    r = s.run(ref, "deb1", "/bin/sh", "-c", script)
    assert r.returncode == 0, r.stderr
    assert 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"' in r.stdout
    assert '{"py": [3, 11]}' in r.stdout
    fetched = sum(proxy.blob_bytes(d) for d in blobs)
    print(f"Debian image: {size} bytes uncompressed, Nydus blobs {total}, fetched {fetched}")
    assert fetched < 0.25 * total, (fetched, total)


# -- stock `ctr image pull` through the content store ------------------------------------------


def _stored(s: NydusStack, kind: str) -> set[str]:
    """Digests under the snapshotter's content store: kind "blobs" or "lazy"."""
    base = s.sn_root / "content" / kind
    return {f"{p.parent.name}:{p.name}" for p in base.glob("sha256/*") if p.name[0] != "."}


def _content_size(s: NydusStack, digest: str) -> int:
    """The size containerd's content store (its metadata) records for ``digest``."""
    with grpc.insecure_channel(f"unix:{s.ctd.address}") as ch:
        c = ServiceClient(ch, CONTENT_SERVICE, [(NAMESPACE_HEADER, s.ctd.namespace)], 10)
        return int(
            c.unary(
                "Info", content_pb2.InfoRequest(digest=digest), content_pb2.InfoResponse
            ).info.size
        )


def _ctr_pull(s: NydusStack, ref: str) -> None:
    s.ctr("image", "pull", "--plain-http", "--snapshotter", "nydus", ref).check()


def test_stock_ctr_pull_and_run_through_the_content_store(
    bb: Image, proxy: FaultProxy, stack: StartStack
) -> None:
    """Stock ``ctr image pull`` + ``ctr run``: the pull downloads no data blob, the run a part."""
    s = stack(content_store=True)
    ref = f"{proxy.host}/{bb.nydus}"
    _ctr_pull(s, ref)
    assert _fetched(proxy, bb) == 0, "the pull downloaded data blobs"
    assert proxy.blob_bytes(bb.bootstrap[0]) == bb.bootstrap[1]
    assert _stored(s, "lazy") == set(bb.blobs), "the blobs are lazy entries, not files"
    assert not _stored(s, "blobs") & set(bb.blobs)
    # containerd counts them as present, with their sizes (from the lazy entries)
    assert {d: _content_size(s, d) for d in bb.blobs} == bb.blobs

    fetched = _run_lazily(s, ref, bb, proxy)
    # pulling again changes nothing and downloads nothing
    _ctr_pull(s, ref)
    assert _fetched(proxy, bb) == fetched

    # removing the image: containerd's GC removes the snapshots, the lazy entries and the
    # real blobs; the cache of unused blobs goes too
    _remove_image(s, ref)
    wait_for(lambda: not _stored(s, "lazy") and not _stored(s, "blobs"), what="content GC")
    assert s.ctr("content", "ls", "-q").check().stdout.strip() == ""
    wait_for(lambda: _cache_files(s) == [], what="cache files of unused blobs deleted")


def test_stock_ctr_pull_applies_the_bootstrap_layer_from_the_content_store(
    bb: Image, proxy: FaultProxy, stack: StartStack
) -> None:
    """Our extension: the bootstrap layer, downloaded once into the snapshotter's content
    store, is applied by the snapshotter (checked: digest, safe extractor, chain ID) and
    committed before containerd's unpack looks for it, so containerd neither reads it back
    through the proxy nor applies it; the container runs on it. The snapshotter's metrics
    count it."""
    port = free_port()
    s = stack("--metrics-address", f"127.0.0.1:{port}", content_store=True)
    ref = f"{proxy.host}/{bb.nydus}"
    _ctr_pull(s, ref)
    boot_digest, boot_size = bb.bootstrap
    assert proxy.blob_bytes(boot_digest) == boot_size  # downloaded once, by containerd's fetch
    assert _fetched(proxy, bb) == 0
    log = s.sn.log_text()
    m = re.search(
        r"Nydus bootstrap layer (sha256:[0-9a-f]{64}) \(blob " + re.escape(boot_digest)
        + r", \d+ entries\) applied from the content store in \d+ ms",
        log,
    )  # fmt: skip
    assert m is not None, log[-4000:]
    assert "not applied from the content store" not in log
    chain = m.group(1)
    # containerd counts the layer unpacked without having applied it: its unpack labels the
    # blob "containerd.io/uncompressed" only after it applied (and diff-ID checked) a layer
    with grpc.insecure_channel(f"unix:{s.ctd.address}") as ch:
        c = ServiceClient(ch, CONTENT_SERVICE, [(NAMESPACE_HEADER, s.ctd.namespace)], 10)
        info = c.unary(
            "Info", content_pb2.InfoRequest(digest=boot_digest), content_pb2.InfoResponse
        ).info
    assert "containerd.io/uncompressed" not in info.labels, dict(info.labels)
    snaps = s.ctr("snapshots", "--snapshotter", "nydus", "ls").check().stdout
    assert re.search(rf"^{re.escape(chain)}\s+sha256:\S+\s+Committed", snaps, re.M), snaps
    r = s.run(ref, "ml1", "/bin/sh", "-c", "cat /etc/hello.txt; md5sum /data/f04")
    assert r.returncode == 0, r.stderr
    assert r.stdout == HELLO + f"{md5(bb.data['data/f04'])}  /data/f04\n"
    # pulling again: the layer is there; nothing applied twice
    _ctr_pull(s, ref)
    assert s.sn.log_text().count("applied from the content store in") == 1
    m = _scrape(port)
    assert m["nydus_snapshotter_bootstrap_applies_total"] == 1
    assert m["nydus_snapshotter_bootstrap_fallbacks_total"] == 0


def test_plain_oci_image_through_the_content_store(
    bb: Image, proxy: FaultProxy, stack: StartStack
) -> None:
    s = stack(content_store=True)
    ref = f"{proxy.host}/{bb.oci}"
    _ctr_pull(s, ref)
    assert not _stored(s, "lazy")
    repo, tag = bb.oci.split(":")
    body, _, _ = proxy.client().get_manifest(repo, tag)
    layers = {ly["digest"] for ly in json.loads(body)["layers"]}
    assert layers <= _stored(s, "blobs"), "the layers are stored for real"
    for d in layers:
        assert proxy.blob_bytes(d) > 0
    r = s.run(ref, "p1", "/bin/sh", "-c", "cat /etc/os-release; md5sum /data/f01")
    assert r.returncode == 0, r.stderr
    assert r.stdout == OS_RELEASE + f"{md5(bb.data['data/f01'])}  /data/f01\n"
    # containerd reads its content back through us (ctr content get)
    blob = s.ctr("content", "get", sorted(layers)[0]).stdout
    assert blob  # text mode; the digest is checked below on the store's file
    d = sorted(layers)[0]
    stored = (s.sn_root / "content" / "blobs" / "sha256" / d.split(":")[1]).read_bytes()
    assert "sha256:" + hashlib.sha256(stored).hexdigest() == d


def test_nydus_pull_through_the_content_store(
    bb: Image, proxy: FaultProxy, stack: StartStack
) -> None:
    """nydus-pull keeps working when containerd's content store is the snapshotter's."""
    s = stack(content_store=True)
    ref = f"{proxy.host}/{bb.nydus}"
    res = nydus_pull(s.ctd, ref)
    assert len(res["applied"]) == 1 and len(res["skipped"]) + len(res["existing"]) == 3, res
    assert _fetched(proxy, bb) == 0
    r = s.run(ref, "np1", "/bin/sh", "-c", "md5sum /data/f02")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{md5(bb.data['data/f02'])}  /data/f02\n"


def test_content_store_survives_a_snapshotter_restart(
    bb: Image, proxy: FaultProxy, stack: StartStack
) -> None:
    s = stack(content_store=True)
    ref = f"{proxy.host}/{bb.nydus}"
    _ctr_pull(s, ref)
    before = s.ctr("content", "ls", "-q").check().stdout.split()
    stored = _stored(s, "blobs"), _stored(s, "lazy")
    s.restart_snapshotter()
    assert (_stored(s, "blobs"), _stored(s, "lazy")) == stored
    assert s.ctr("content", "ls", "-q").check().stdout.split() == before
    # what containerd reads through us is still there: a container starts
    r = s.run(ref, "r1", "/bin/cat", "/etc/hello.txt")
    assert r.returncode == 0 and r.stdout == HELLO, r.stderr
    _ctr_pull(s, ref)  # and the image needs nothing new
    assert _fetched(proxy, bb) < 0.3 * bb.blob_total
    # reading a lazy blob through containerd fetches its real bytes (checked) from the
    # registry recorded in containerd's distribution-source label, then serves them
    digest = max(bb.blobs, key=lambda d: bb.blobs[d])
    p = subprocess.run(
        ["ctr", "-a", str(s.ctd.address), "-n", s.ctd.namespace, "content", "get", digest],
        capture_output=True, timeout=120, env={"PATH": PATH_ENV},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "sha256:" + hashlib.sha256(p.stdout).hexdigest() == digest
    assert digest in _stored(s, "blobs") and digest not in _stored(s, "lazy")


def test_stock_ctr_pull_without_the_content_store_fails_clearly(
    bb: Image, proxy: FaultProxy, stack: StartStack
) -> None:
    """Without the content proxy, containerd 1.6's unpack looks for the blob layers in its own
    metadata (they are not there: nothing told it) and then tries to apply them: the pull
    fails, after downloading everything. The snapshotter's error says what to do."""
    s = stack()
    ref = f"{proxy.host}/{bb.nydus}"
    r = s.ctr("image", "pull", "--plain-http", "--snapshotter", "nydus", ref)
    assert r.returncode != 0
    assert "is a Nydus data blob" in r.stderr and "--content-store" in r.stderr, r.stderr
    assert _fetched(proxy, bb) == bb.blob_total  # containerd's fetch took them all
    # nydus-pull still works on the same stack, and so does ctr run after it
    res = nydus_pull(s.ctd, ref)
    assert len(res["skipped"]) == 3 and len(res["applied"]) == 1, res
    r = s.run(ref, "n1", "/bin/cat", "/etc/hello.txt")
    assert r.returncode == 0 and r.stdout == HELLO, r.stderr


def _directory_times_from(tar: Path, dest: Path) -> None:
    """The directories' mtimes of ``tar`` set again in its extraction ``dest``: GNU tar replaces
    its placeholders of symlinks (busybox's applet links) after it set the directory times."""
    with tarfile.open(tar) as tf:
        for m in tf:
            if m.isdir():
                ns = int(m.mtime * 1_000_000_000)
                os.utime(dest / m.name, ns=(ns, ns), follow_symlinks=False)


def test_oci_ref_image_with_stock_ctr(
    bb: Image,
    proxy: FaultProxy,
    stack: StartStack,
    registry_plain: RegistryServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A zran reference image (``nydusify convert --oci-ref``) runs with stock ``ctr`` like a
    Nydus image: the registry receives only the small artifact; the container's rootfs equals a
    kernel overlayfs of the source's unpacked gzip layers, read lazily from those layers."""
    nydusify_convert(f"{proxy.host}/{bb.oci}", f"{proxy.host}/bbdata:1-ref", tmp_path / "conv",
                     "--oci-ref")  # fmt: skip
    client = registry_plain.client()
    body, _, _ = client.get_manifest("bbdata", "1-ref")
    doc = json.loads(body)
    artifact = sum(d["size"] for d in doc["layers"]) + doc["config"]["size"] + len(body)
    assert proxy.received == artifact, "the registry received more than the artifact"
    body, _, _ = client.get_manifest("bbdata", "1")
    layers = {ly["digest"]: ly["size"] for ly in json.loads(body)["layers"]}
    proxy.clear()
    s = stack(content_store=True)
    ref = f"{proxy.host}/bbdata:1-ref"
    _ctr_pull(s, ref)
    assert sum(proxy.blob_bytes(d) for d in layers) == 0, "the pull downloaded layers"
    r = s.run(ref, "z1", "/bin/sh", "-c", "cat /etc/os-release; md5sum /data/f03")
    assert r.returncode == 0, r.stderr
    assert r.stdout == OS_RELEASE + f"{md5(bb.data['data/f03'])}  /data/f03\n"
    fetched = sum(proxy.blob_bytes(d) for d in layers)
    assert 0 < fetched < sum(layers.values()), (fetched, layers)
    print(f"oci-ref: artifact {artifact} B pushed; run fetched {fetched} of "
          f"{sum(layers.values())} B of gzip layers")  # fmt: skip
    # the whole rootfs of a running container against kernel overlayfs of the source layers
    layer_dirs = []
    for i, digest in enumerate(layers):
        tar = tmp_path / f"layer{i}.tar.gz"
        tar.write_bytes(client.get_blob("bbdata", digest))
        layer_dirs.append(tmp_path / f"lower{i}")
        unpack_for_overlay(tar, layer_dirs[-1])
        _directory_times_from(tar, layer_dirs[-1])
    ovl = tmp_path / "ovl"
    ovl.mkdir()
    lowerdir = ":".join(str(p) for p in reversed(layer_dirs))
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lowerdir}", str(ovl)],
                   check=True, capture_output=True)  # fmt: skip
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    try:
        # the running container's rootfs: its snapshot's lower directories (the image, as the
        # snapshotter mounts it), read-only, without the container's own upper directory
        s.ctr("run", "-d", "--snapshotter", "nydus", ref, "z2", "/bin/sleep", "600").check()
        try:
            out = s.ctr("snapshots", "--snapshotter", "nydus", "mounts", "/x", "z2").check().stdout
            found = re.search(r"lowerdir=([^,\s]+)", out)
            assert found, out
            lowers = found.group(1).split(":")
            if len(lowers) == 1:  # the image in one directory (overlayfs wants two lowers)
                diffs = compare_trees(ovl, Path(lowers[0]))
            else:
                subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                                f"ro,lowerdir={found.group(1)}", str(rootfs)],
                               check=True, capture_output=True)  # fmt: skip
                try:
                    diffs = compare_trees(ovl, rootfs)
                finally:
                    subprocess.run(["umount", str(rootfs)], check=True)
            # the root directory's attributes are its top lower directory's (the reference's
            # is a directory tar created), not an entry of the image
            assert [d for d in diffs if not d.startswith(".: ")] == []
        finally:
            _remove_container(s, "z2")
    finally:
        subprocess.run(["umount", str(ovl)], check=True)
    print(f"oci-ref: whole rootfs read, fetched {sum(proxy.blob_bytes(d) for d in layers)} B")
    _remove_image(s, ref)
