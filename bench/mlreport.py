"""Summary, plots, report and the issue's targets of ``bench/coldstart.py --image ml``
(bench/coldstart_ml.py runs the rounds). Single-threaded; pure functions of the rounds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mlrecords import WORKLOADS, MlImage, MlRound


def _med(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs) if xs else float("nan")


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _each(secs: list[float]) -> str | None:
    """A container run's seconds, each of several (the median is the figure)."""
    return " ".join(f"{x:.2f}" for x in secs) + " s each" if secs else None


def round_line(r: MlRound) -> str:
    """One round in a line (the report's per-round list and the progress output)."""
    line = (
        f"{r.link} {r.workload} {r.scenario}: pull {r.pull_s:.2f}s, run {r.run_s:.2f}s, "
        f"registry {_mib(r.registry_bytes)}, reads {r.reads}, backend requests "
        f"{r.backend_requests}"
    )
    if r.prefetch_bytes:
        line += f", prefetch {_mib(r.prefetch_bytes)}"
    if r.behind_prefetch[0]:
        n, b = r.behind_prefetch
        line += f", {n} user requests behind prefetch ({_mib(b)} then in flight)"
    if r.second_run_s is not None:
        line += f", prefetch done {r.prefetch_wait_s:.1f}s later"
        optional: list[tuple[object, str]] = [  # each piece only when measured
            (r.durable_wait_s, " (on disk {:.2f}s after all was cached)"),
            (r.dirty_mib, ", dirty {:.0f} MiB"),
            (r.writeback_mib, " (+{:.0f} MiB under writeback)"),
            (r.second_run_s, ", 2nd run {:.2f}s"),
            (_each(r.second_runs), " ({})"),
            (r.second_run_reads, " ({} reads served)"),
        ]
        line += "".join(fmt.format(v) for v, fmt in optional if v is not None)
    if r.native_run_s is not None:
        line += f", native {r.native_wait_s:.1f}s later, 3rd run {r.native_run_s:.2f}s"
        line += f" ({_each(r.native_runs)})" if r.native_runs else ""
    if r.warm_run_s is not None:
        line += f", warm run {r.warm_run_s:.2f}s"
        line += f" ({_each(r.warm_runs)})" if r.warm_runs else ""
    if r.phases:
        line += ", phases " + " ".join(
            f"{k} {v:.0f}"
            if k == "user_fetches" or k.startswith(("ra_", "rss"))
            else f"{k} {v:.2f}"
            for k, v in r.phases.items()
        )
    return line + f", load {r.load:.1f}"


# (what, scenario, anchor or "limit", bound): the targets, each a ratio of medians
TIME_TARGETS = (
    ("optimized image, W1 total vs the physical limit", "optimized", "limit", 1.15, ("W1",)),
    ("prefetch_all, W2 total vs the physical limit", "prefetch_all", "limit", 1.3, ("W2",)),
    ("prefetch_all vs no prefetch (lazy), total", "prefetch_all", "lazy", 1.05, ("W1", "W2")),
    ("the same, CPU hog on one core", "prefetch_all+hog", "lazy+hog", 1.05, ("W1", "W2")),
    ("lazy total vs the physical limit", "lazy", "limit", 1.6, ("W1", "W2")),
)


def targets(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The issue's targets beside the ratios measured in this run (met / not met); a target
    whose scenarios were not run is left out."""
    rows: list[tuple[str, str, str, float, float]] = []
    for link, per_wl in summary.items():
        for wl, per in per_wl.items():
            for what, sc, anchor, bound, wls in TIME_TARGETS:
                v, a = per.get(sc), per.get(anchor)
                if wl in wls and v and a:
                    rows.append((what, link, wl, v["total_s"] / a["total_s"], bound))
            for sc, v in per.items():
                base = sc.split("+")[0]
                if base in ("lazy", "prefetch_all") and v.get("needed"):
                    user = v["backend_bytes"] - (v["prefetch_bytes"] or 0)
                    what = f"bytes fetched for the reads vs the chunks read ({sc}" + (
                        ", prefetch traffic apart)" if base == "prefetch_all" else ")"
                    )
                    rows.append((what, link, wl, user / v["needed"], 1.3))
            pf, oci = per.get("prefetch_all"), per.get("oci")
            for k, what in (
                ("second_run_s", "2nd container after prefetch vs the OCI warm run"),
                ("native_run_s", "3rd container, after the switch to native, vs the same"),
            ):
                if pf and oci and pf[k] and oci["warm_run_s"]:
                    rows.append((what, link, wl, pf[k] / oci["warm_run_s"], 1.1))
    if not rows:
        return []
    out = [
        "## The issue's targets (ratios of this run's medians)",
        "",
        "| target | link | workload | measured | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for what, link, wl, ratio, bound in rows:
        met = "met" if ratio <= bound else "not met"
        out.append(f"| {what} | {link} | {wl} | {ratio:.2f}x | <= {bound:g}x | {met} |")
    return [*out, ""]


def summarize(
    rounds: list[MlRound], img: MlImage, rates: dict[str, int], names: list[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """link -> workload -> scenario (and ``limit``) -> medians."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for link in dict.fromkeys(r.link for r in rounds):
        for wl in dict.fromkeys(r.workload for r in rounds if r.link == link):
            per: dict[str, Any] = {}
            for sc in names:
                rs = [r for r in rounds if (r.link, r.workload, r.scenario) == (link, wl, sc)]
                if not rs:
                    continue
                v: dict[str, Any] = {"n": len(rs)}
                for k in (
                    "pull_s",
                    "run_s",
                    "total_s",
                    "registry_bytes",
                    "wire",
                    "reads",
                    "backend_requests",
                    "needed",
                    "warm_run_s",
                    "load",
                    "backend_bytes",
                    "prefetch_bytes",
                    "prefetch_wait_s",
                    "second_run_s",
                    "native_run_s",
                    "dirty_mib",
                    "writeback_mib",
                ):
                    xs = [getattr(r, k) for r in rs if getattr(r, k) is not None]
                    v[k] = _med(xs) if xs else None
                per[sc] = v
            warm = (per.get("oci") or {}).get("warm_run_s")
            needed = next((v["needed"] for v in per.values() if v["needed"] is not None), None)
            if warm is not None and needed is not None:
                bytes_ = needed + img.meta[img.nydus]
                per["limit"] = {
                    "bytes": bytes_,
                    "transfer_s": bytes_ * 8 / (rates[link] * 1e6),
                    "warm_run_s": warm,
                }
                per["limit"]["total_s"] = per["limit"]["transfer_s"] + warm
            out.setdefault(link, {})[wl] = per
    return out


def _ociref_line(img: MlImage) -> str:
    """The reference images' conversions beside the full one (empty when none was made)."""
    full = img.meta[img.nydus] + img.blobs[img.nydus]
    parts = [
        f"`{tag}` (spacing {int(spacing) >> 10} KiB): converted in {secs:.0f}s at load "
        f"{load:.1f}, artifact {_mib(img.meta[tag] + img.blobs[tag])} (meta blobs "
        f"{_mib(img.blobs[tag])}, pull metadata {_mib(img.meta[tag])})"
        for tag, (secs, load, spacing) in img.ref_convert.items()
    ]
    if not parts:
        return ""
    return (
        " Reference images (`nydusify convert --oci-ref`, zran; the data stays in the OCI "
        f"image's gzip layers): {'; '.join(parts)}; vs {_mib(full)} for the full Nydus image, "
        f"converted in {img.convert_s:.0f}s in an earlier run."
    )


COLORS = {
    "lazy": "#1b9e77",
    "ociref": "#e7298a",
    "prefetch_all": "#d95f02",
    "optimized": "#7570b3",
    "oci": "#666666",
}
EXTRA_COLORS = ("#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#1f78b4", "#b15928")


def _style(name: str, names: list[str]) -> tuple[str, str]:
    """(colour, line style) of a scenario's timeline: its base's colour; dashed with a modifier
    (another colour when several scenarios share the base)."""
    if name in COLORS:
        return COLORS[name], "-"
    base = name.split("+")[0]
    if base in names:
        return EXTRA_COLORS[names.index(name) % len(EXTRA_COLORS)], "--"
    return COLORS.get(base, "#000000"), "--"


def plot(
    summary: dict[str, dict[str, dict[str, Any]]],
    rounds: list[MlRound],
    stem: Path,
    names: list[str],
) -> list[Path]:
    """Per link: for each workload, the pull/run bars of every scenario (medians) and the
    physical limit; beside them the timeline of bytes the registry sent (first round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for link, per_wl in summary.items():
        wls = list(per_wl)
        fig, axes = plt.subplots(
            len(wls),
            2,
            figsize=(13, 0.6 + 2.6 * len(wls)),
            squeeze=False,
            gridspec_kw={"width_ratios": [1, 1]},
        )
        for row, wl in enumerate(wls):
            ax, tax = axes[row, 0], axes[row, 1]
            per = per_wl[wl]
            scs = [s for s in names if s in per]
            top = max(per[s]["total_s"] for s in scs)
            for y, sc in enumerate(scs):
                v = per[sc]
                ax.barh(y, v["pull_s"], color="#8da0cb", label="pull" if y == 0 else None)
                ax.barh(
                    y,
                    v["run_s"],
                    left=v["pull_s"],
                    color="#fc8d62",
                    label="run" if y == 0 else None,
                )
                ax.text(v["total_s"], y, f" {v['total_s']:.1f}s", va="center", fontsize=8)
            lim = per.get("limit")
            if lim:
                ax.axvline(
                    lim["total_s"],
                    color="k",
                    ls="--",
                    lw=1,
                    label=f"physical limit {lim['total_s']:.2f}s",
                )
            ax.set_xlim(0, top * 1.15)
            ax.set_yticks(range(len(scs)), scs)
            ax.invert_yaxis()
            ax.set_title(f"{wl} ({link}): {WORKLOADS[wl][0]}", fontsize=9)
            ax.set_xlabel("seconds from pull start (median)")
            ax.legend(fontsize=7, loc="upper right")
            for sc in scs:
                r = next(
                    (
                        r
                        for r in rounds
                        if (r.link, r.workload, r.scenario) == (link, wl, sc) and r.timeline
                    ),
                    None,
                )
                if r is None:
                    continue
                ts = [t for t, _b in r.timeline]
                bs = [b / 2**20 for _t, b in r.timeline]
                color, ls = _style(sc, names)
                tax.plot(ts, bs, color=color, ls=ls, label=sc, lw=1.4)
                tax.axvline(r.pull_s, color=color, ls=":", lw=0.8)
            nyd = [per[s]["total_s"] for s in scs if not s.startswith("oci")]
            right = min(top * 1.05, 2.5 * max(nyd)) if nyd else top * 1.05
            tax.set_xlim(0, right)
            if right < top:
                tax.text(
                    0.99,
                    0.02,
                    f"(oci goes on to {per['oci']['total_s']:.0f}s)",
                    transform=tax.transAxes,
                    ha="right",
                    fontsize=7,
                )
            tax.set_ylabel("MiB sent by the registry")
            tax.set_xlabel("seconds from pull start (round 0; dotted: pull done)")
            tax.set_title(f"{wl} ({link}): registry bytes over time", fontsize=9)
            tax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        p = stem.parent / f"{stem.name}-{link.replace(' ', '')}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def report(
    args: Any,
    img: MlImage,
    rounds: list[MlRound],
    summary: dict[str, dict[str, dict[str, Any]]],
    pngs: list[Path],
    loads: tuple[float, float],
    names: list[str],
) -> str:
    import datetime as dt
    import platform

    import mlimage

    o = img.optimize_report
    lines = [
        f"# Cold start benchmark, ml image, {dt.datetime.now():%Y-%m-%d %H:%M} (preliminary)",
        "",
        "**Preliminary figures**: one shared machine (2 cores) on which other sessions ran "
        f"tests during the runs: 1-minute load average {loads[0]:.1f} at the start and "
        f"{loads[1]:.1f} at the end; {args.rounds} round(s) per scenario (medians when more). "
        "CPU-bound steps (OCI unpack, nydusd's decompression, python imports) slow down under "
        "that load, so absolute times are pessimistic and noisy.",
        "",
        f"Image (bench/mlimage.py): Debian 12 minbase; python3 + python3-pip (apt); pip "
        f"{' '.join(mlimage.PIP_PACKAGES)} + the CPU torch wheel from /opt/wheels. "
        f"{img.entries} tar entries, {_mib(img.rootfs_bytes)} of file data; OCI image "
        f"{_mib(img.oci_bytes)} (3 gzip layers). Nydus (our nydusify, zstd, 1 MiB chunks, "
        f"converted in {img.convert_s:.0f}s): blobs {_mib(img.blobs[img.nydus])}, pull "
        f"metadata (manifest, config, bootstrap layer) {_mib(img.meta[img.nydus])}. Optimized "
        f"(our `nydusify optimize` in {img.optimize_s:.0f}s from W1's access pattern recorded by "
        f"our snapshotter, {img.prefetch_files} files): + prefetch blob "
        f"{_mib(o.get('prefetch_blob_size', 0))} ({o.get('files', 0)} files, "
        f"{_mib(o.get('bytes', 0))} uncompressed), pull metadata {_mib(img.meta[img.opt])}."
        + _ociref_line(img),
        "",
        "Workloads: " + "; ".join(f"{k} `{v[0]}`" for k, v in WORKLOADS.items()) + ".",
        "",
        "Scenarios, each round from a fresh containerd 1.6 + runc and a fresh "
        "`containerd-nydus-grpc` (kernel EROFS mode, empty blob cache): `lazy` (no prefetch), "
        "`prefetch_all` (`fs_prefetch` with `prefetch_all`), `optimized` (the optimized image, "
        "`fs_prefetch` on: the prefetch table's files, fetched from the front of the prefetch "
        "blob), `ociref` (the zran reference image of `nydusify convert --oci-ref`, no prefetch: "
        "nydusd reads the original gzip layers with range requests), `oci` (stock "
        "`ctr image pull`: containerd's overlayfs, every layer downloaded and unpacked). "
        "Nydus pulls are stock `ctr image pull --snapshotter nydus` with the "
        "content store proxied to the snapshotter. The optimized image is made from W1's pattern; "
        "W2 runs on it too (a workload it was not made for). `+hog`: the same with a CPU hog "
        "(a busy loop pinned to one of the two cores) from the pull to the workload's exit. "
        "`+amp=N`: the daemon's `amplify_io` set to N bytes (the default config's otherwise). "
        "`+base`: the snapshotter and nydusd of the base source tree "
        f"(`{getattr(args, 'base_src', None)}`), the A/B anchor.",
        "",
        f"Links: Debian's docker-registry in a network namespace behind `tc tbf` at the rate "
        f"given (both veth ends), plus a {args.rtt_ms:g} ms RTT added by a userspace TCP proxy "
        "(bench/coldstart_ml.py DelayProxy: this kernel has no netem; the proxy costs CPU).",
        "",
        "Columns: `pull` = `ctr image pull` (s), `run` = `ctr run` to the workload's exit (s), "
        "`total` = both; `registry` = bytes the registry served for the image (OCI: manifest, "
        "config, layers; Nydus: pull metadata + nydusd's backend `read_amount_total` when the "
        "workload ended: `prefetch_all` keeps fetching after that); `wire` = bytes the "
        "namespace side of the veth sent (TCP/HTTP included); `reads` = READ requests nydusd "
        "served (blob-device reads in EROFS mode); `backend req` = nydusd's backend requests; "
        "`prefetch` = nydusd's `prefetch_data_amount` when the workload ended (part of "
        "`registry`); `2nd run s` (`prefetch_all`): after the workload, once nydusd's metrics say "
        "the prefetch is done (and every blob is in the cache), the workload run again in a "
        "second container of the same image, then (after the slash) in a third once nydusd "
        "switched the image to native (blobs hashed, EROFS remounted on the local cache "
        "files); `oci`: the warm run on the unpacked image; `dirty + wb MiB` (`prefetch_all`): "
        "the system's dirty page cache (`/proc/meminfo` `Dirty`, then `Writeback`: pages "
        "being written) just before the second container starts (the blob cache shares a "
        "file system with containerd's state: the first container's overlayfs unmount syncs "
        "it). Each round ends with an `os.sync()`.",
        "",
        "**Physical limit** (per link and workload, computed in the same run): (the Nydus "
        "pull metadata + the compressed bytes of every chunk holding a byte the workload read, "
        "from the workload's access pattern recorded by a separate lazy run with "
        "`access_pattern` on (blob-device reads mapped to files and file ranges), each chunk "
        "once) * 8 / link rate + "
        "the warm run time (the workload run again in a container on the already unpacked "
        "OCI image, files in the page cache). It ignores the RTT, request overheads and "
        "decompression: no lazy scheme can start the workload faster over that link.",
        "",
    ]
    for link, per_wl in summary.items():
        for wl, per in per_wl.items():
            lines += [
                f"## {link}, {wl}",
                "",
                "| scenario | pull s | run s | total s | registry | wire | reads | "
                "backend req | prefetch | 2nd run s | dirty + wb MiB | vs OCI | vs limit | load |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            oci_total = (per.get("oci") or {}).get("total_s")
            lim = per.get("limit")
            for sc in names:
                v = per.get(sc)
                if not v:
                    continue
                second = _fmt(v["second_run_s"] if sc != "oci" else v["warm_run_s"])
                if v["native_run_s"] is not None:
                    second += f" / {v['native_run_s']:.2f}"
                vs_oci = f"{oci_total / v['total_s']:.1f}x" if oci_total and sc != "oci" else ""
                vs_lim = f"{v['total_s'] / lim['total_s']:.1f}x" if lim else ""
                reads = "-" if v["reads"] is None else f"{v['reads']:.0f}"
                breq = "-" if v["backend_requests"] is None else f"{v['backend_requests']:.0f}"
                dirty = "-" if v.get("dirty_mib") is None else f"{v['dirty_mib']:.0f}"
                if v.get("writeback_mib") is not None:
                    dirty += f" + {v['writeback_mib']:.0f}"
                lines.append(
                    f"| {sc} | {v['pull_s']:.2f} | {v['run_s']:.2f} | {v['total_s']:.2f} | "
                    f"{_mib(v['registry_bytes'])} | {_mib(v['wire'])} | {reads} | {breq} | "
                    f"{_mib(v['prefetch_bytes'])} | {second} | {dirty} | "
                    f"{vs_oci} | {vs_lim} | {v['load']:.1f} |"
                )
            if lim:
                lines.append(
                    f"| physical limit | | | {lim['total_s']:.2f} | {_mib(lim['bytes'])} | | | | "
                    f"| | | | 1.0x | |"
                )
                lines += [
                    "",
                    f"Limit: {_mib(lim['bytes'])} at the link rate = "
                    f"{lim['transfer_s']:.2f}s + warm run {lim['warm_run_s']:.2f}s.",
                ]
            lines.append("")
    lines += targets(summary)
    for p in pngs:
        lines += [f"![timeline {p.stem}]({p.name})", ""]
    lines += ["Per round:", ""]
    lines += ["- " + round_line(r) for r in rounds]
    lines += [
        "",
        f"Machine: python {platform.python_version()}, kernel {platform.release()}, "
        f"{os.cpu_count()} cpus.",
    ]
    return "\n".join(lines) + "\n"
