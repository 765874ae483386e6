"""What the ml cold start benchmark records (issue 17): its workloads, the image it measured and
one round's figures. bench/coldstart_ml.py fills them in; bench/mlreport.py reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

WORKLOADS = {
    "W1": ("python3 -c 'import numpy, pandas; print(\"ok\")'", "ok"),
    "W2": ("python3 -c 'import torch; print(torch.ones(2).sum())'", "tensor(2.)"),
}


@dataclass
class MlImage:
    oci: str = "ml:1"
    nydus: str = "ml:1-nydus"
    opt: str = "ml:1-opt"
    ref: str = "ml:1-ref"  # nydusify convert --oci-ref
    oci_bytes: int = 0  # manifest + config + layers
    meta: dict[str, int] = field(default_factory=dict)  # tag -> manifest+config+bootstrap
    blobs: dict[str, int] = field(default_factory=dict)  # tag -> data blob bytes
    rootfs_bytes: int = 0
    entries: int = 0
    convert_s: float = 0.0
    # --oci-ref tag -> [conversion seconds, 1-minute load average at its end, zran spacing]
    ref_convert: dict[str, list[float]] = field(default_factory=dict)
    optimize_s: float = 0.0
    prefetch_files: int = 0
    optimize_report: dict[str, Any] = field(default_factory=dict)


@dataclass
class MlRound:
    link: str
    scenario: str
    workload: str
    pull_s: float
    run_s: float
    total_s: float
    registry_bytes: int
    wire: int | None = None
    reads: int | None = None  # READs the daemon served (FUSE or blob device)
    backend_requests: int | None = None
    backend_bytes: int | None = None
    needed: int | None = None  # lazy: compressed bytes of the chunks the workload read
    warm_run_s: float | None = None  # oci: runs on the unpacked image (median of warm_runs)
    warm_runs: list[float] = field(default_factory=list)  # each warm container's seconds
    load: float = 0.0
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (s, registry bytes)
    prefetch_bytes: int | None = None  # nydusd's prefetch_data_amount when the workload ended
    prefetch_wait_s: float | None = None  # prefetch_all: from the workload's end to prefetch done
    durable_wait_s: float | None = None  # and of that, from all cached to all on disk (fdatasync)
    second_run_reads: int | None = None  # READs nydusd served during the 2nd container
    # NYDUS_BENCH_STACKS: the runtime's threads in D state during the 2nd container
    second_run_stacks: dict[str, Any] | None = None
    second_run_s: float | None = None  # prefetch_all: 2nd containers once prefetch is done
    second_runs: list[float] = field(default_factory=list)  # each one's seconds (median above)
    native_wait_s: float | None = None  # prefetch_all: from the 2nd run's end to the native switch
    native_run_s: float | None = None  # prefetch_all: 3rd containers after the native switch
    native_runs: list[float] = field(default_factory=list)  # each one's seconds (median above)
    behind_prefetch: tuple[int, int] = (0, 0)  # user requests behind prefetch, its bytes
    # the first 2nd run's wall-clock start and end (oci: the first warm run's)
    second_run_at: tuple[float, float] | None = None
    dirty_mib: float | None = None  # prefetch_all: /proc/meminfo Dirty just before the 2nd run
    writeback_mib: float | None = None  # and Writeback (pages being written, not yet on disk)
    # Nydus: when things happened, seconds from the pull's start (nydusd's log and metrics):
    # pull (end), nydusd (process started), up (its first log line: imports done), prefetch
    # (the table's files submitted), running (mounted, RUNNING), pf_begin / pf_end (prefetch
    # metrics; pf_end absent while it runs), exit (the workload's end); and the read path's
    # sums in seconds: read (blob-device READs), user_fetch (reads waiting for the backend),
    # backend (user requests on the wire), decode, verify, cache; user_fetches (count); ra_windows,
    # ra_requests, ra_bytes, ra_hits (locality readahead, newer daemons); boot_apply: seconds the
    # snapshotter spent applying the bootstrap layer itself (absent when containerd applied it)
    # nydusd_cpu: CPU seconds (user + sys) the first nydusd used by the workload's exit; rss: its
    # resident memory then (MiB), rss_end: after the second (and third) containers
    phases: dict[str, float] = field(default_factory=dict)
