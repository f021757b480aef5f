"""Aggregate the runs (median, min, max), write JSON, a Markdown table and a bar chart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from benchmarks.common import REPORT, RESULTS, summary

CONTENDERS = {
    "consume": "Ceiling: consume only (aiokafka getmany, no decode)",
    "insert": "Ceiling: insert only (asynch, worker schema, batch.max_rows blocks)",
    "sink_w1": "sink run, 1 worker (dedup on)",
    "sink_w2": "sink run --workers 2 (dedup on)",
    "sink_cluster": "sink run, 1 worker, 2x2 cluster, insert_quorum 2 (default)",
    "sink_cluster_q0": "sink run, 1 worker, 2x2 cluster, no insert quorum",
    "peer": "ClickHouse Kafka engine + MV (no dedup, at-least-once)",
    "naive": "Naive: per-record Redis SET NX, insert per poll",
}


SINKS = ("sink_w1", "sink_w2", "sink_cluster", "sink_cluster_q0")
"""The sink's own runs: one server with 1 and 2 workers, a cluster with and without quorum."""


def rates(result: dict[str, Any]) -> dict[str, Any]:
    """events/s: Kafka records handled per second (rows per second for the insert ceiling).
    `steady` leaves out start-up (process start, group join, migration, first batch): from
    the first landed/read record to the last; `wall` is from start to the last."""
    out: dict[str, Any] = {}
    if result.get("error"):
        return out
    count = result.get("records", result.get("rows"))
    steady_n = result.get("steady_records", count)
    # Steady state needs a stretch of its own: most of the records, over a second or more.
    if result.get("steady_s") and result["steady_s"] >= 1.0 and steady_n >= 0.5 * count:
        out["steady"] = steady_n / result["steady_s"]
    if result.get("wall_s"):
        out["wall"] = count / result["wall_s"]
    cpu = result.get("timed_cpu_s", result.get("cpu_s"))
    if cpu is not None and count:
        out["cpu_s_per_m"] = cpu / count * 1e6
    if result.get("peak_rss_total"):
        out["rss_total_mb"] = result["peak_rss_total"] / 2**20
        out["rss_single_mb"] = result.get("peak_rss_single", result["peak_rss_total"]) / 2**20
    return out


def aggregate(raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    agg: dict[str, Any] = {}
    for name, results in raw.items():
        per_run = [rates(r) for r in results]
        agg[name] = {
            key: summary([p[key] for p in per_run if key in p])
            for key in ("steady", "wall", "cpu_s_per_m", "rss_total_mb", "rss_single_mb")
        }
        agg[name]["runs"] = len(results)
        agg[name]["failed"] = sum(1 for r in results if r.get("error"))
    return agg


SHAPES = ("flat", "mixed", "binary")


def prefix(shape: str) -> str:
    """The key prefix of a workload's contenders: none for the flat one (`sink_w1`), the
    shape for the others (`mixed_sink_w1`)."""
    return "" if shape == "flat" else f"{shape}_"


def title(key: str) -> str:
    """A contender's title from its key, the workload shown for all but the flat one."""
    for shape in SHAPES[1:]:
        if key.startswith(prefix(shape)):
            return f"[{shape}] " + CONTENDERS[key[len(prefix(shape)) :]]
    return CONTENDERS[key]


def workload_keys(agg: dict[str, Any]) -> list[str]:
    """The contenders measured, workload by workload, in the table's order."""
    return [prefix(w) + k for w in SHAPES for k in CONTENDERS if prefix(w) + k in agg]


def ratios(agg: dict[str, Any]) -> dict[str, dict[str, float]]:
    """sink / other of the same workload, per kind (steady, wall), from the medians; for a
    workload other than the flat one also `flat_<kind>`: this workload's figure over the
    same contender's on the flat workload, and `flat_cpu` for CPU per event."""
    out: dict[str, dict[str, float]] = {}
    for shape in SHAPES:
        pre = prefix(shape)
        for sink in SINKS:
            if pre + sink not in agg:
                continue
            mine_agg = agg[pre + sink]
            row = out[pre + sink] = {}
            for other in ("consume", "insert", "peer", "naive", "sink_w1", "sink_cluster_q0"):
                if other == sink or pre + other not in agg:
                    continue
                for kind in ("steady", "wall"):
                    mine, theirs = mine_agg.get(kind), agg[pre + other].get(kind)
                    if mine and theirs and theirs["median"]:
                        row[f"{other}_{kind}"] = mine["median"] / theirs["median"]
            if pre and sink in agg:
                for kind in ("steady", "wall", "cpu_s_per_m"):
                    mine, theirs = mine_agg.get(kind), agg[sink].get(kind)
                    if mine and theirs and theirs["median"]:
                        name = "flat_cpu" if kind == "cpu_s_per_m" else f"flat_{kind}"
                        row[name] = mine["median"] / theirs["median"]
        peer = agg.get(pre + "peer")
        if pre and peer and agg.get("peer"):
            row = out[pre + "peer"] = {}
            for kind in ("steady", "wall"):
                mine, theirs = peer.get(kind), agg["peer"].get(kind)
                if mine and theirs and theirs["median"]:
                    row[f"flat_{kind}"] = mine["median"] / theirs["median"]
    return out


def _fmt_rate(s: dict[str, float] | None) -> str:
    if not s:
        return "n/a"
    if s["n"] == 1:
        return f"{s['median']:,.0f}"
    return f"{s['median']:,.0f} ({s['min']:,.0f}\u2013{s['max']:,.0f})"


def _fmt(s: dict[str, float] | None, digits: int = 1) -> str:
    if not s:
        return "\u2013"
    return f"{s['median']:,.{digits}f}"


def markdown(doc: dict[str, Any]) -> str:
    meta, agg, rat = doc["meta"], doc["aggregate"], doc["ratios"]
    load = meta["load"]
    loads = meta.get("loads") or {"flat": load}
    lines = [f"# sink benchmark — {meta['started']}", ""]
    for shape, w in loads.items():
        lines.append(
            f"- **{shape}** workload: N = {w['records']:,} records ({w['unique_valid']:,} "
            f"unique valid, {w['duplicates']:,} duplicates, {w['invalid']:,} invalid; "
            f"{w['avg_record_bytes']:.0f} bytes average) on {len(w['topics'])} topics x "
            f"{w['partitions_per_topic']} partitions, {w['subjects']:,} subjects; loading "
            f"(not timed) {w['load_seconds']:.1f} s, {w['load_records_per_s']:,} records/s."
            + (" Sink runs with the meters of `benchmarks.workload.MIXED_METERS`."
               if shape == "mixed" else "")
        )  # fmt: skip
    lines += [
        "",
        f"{meta['runs']} run(s), median (min\u2013max); the workloads take turns within each "
        f"run. Naive baseline on {meta['naive_events']:,} records of the flat workload.",
        "",
        f"Machine: {meta['cpus']} CPUs shared by Kafka, ClickHouse {meta['clickhouse']}, Redis, "
        f"the contenders and other work (load average at start "
        f"{meta['loadavg'][0]:.1f}); numbers are noisy. Python {meta['python']}. Worker code: "
        + ", ".join(f"{k} {v}" for k, v in (meta.get("code") or {}).items())
        + "."
        + (
            " Worker defaults: "
            + ", ".join(f"{k} {v:,}" for k, v in meta["worker_defaults"].items())
            + "."
            if meta.get("worker_defaults")
            else ""
        ),
        "",
        "| contender | events/s steady | events/s wall | CPU s / M events | peak RSS MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in workload_keys(agg):
        a = agg[key]
        rss = "\u2013"
        if a.get("rss_total_mb"):
            rss = f"{a['rss_total_mb']['median']:,.0f}"
            if key.endswith("sink_w2") and a.get("rss_single_mb"):
                rss += f" (largest process {a['rss_single_mb']['median']:,.0f})"
        failed = f" — {a['failed']} run(s) failed" if a.get("failed") else ""
        results = doc["raw"].get(key, [])
        inexact = sum(1 for r in results if "exact" in r and not r["exact"]["ok"])
        if inexact:
            failed += f" — **NOT EXACT in {inexact} of {len(results)} run(s)**"
        lines.append(
            f"| {title(key)}{failed} | {_fmt_rate(a['steady'])} | {_fmt_rate(a['wall'])} | "
            f"{_fmt(a['cpu_s_per_m'])} | {rss} |"
        )
    lines += [
        "",
        "events/s = Kafka records handled per second (for the insert ceiling: rows inserted "
        "per second; the sink inserts only the unique valid share). *steady* leaves out "
        "start-up: from the first landed (or read) record to the last. CPU is that of the "
        "contender's own process(es) only, not Kafka, ClickHouse or Redis "
        "(see `services_cpu` in the JSON). For the peer, all the work is inside ClickHouse.",
        "",
    ]
    if any(rat.values()):
        names = {"consume": "consume ceiling", "insert": "insert ceiling", "peer": "peer",
                 "naive": "naive", "sink_w1": "sink 1 worker",
                 "sink_cluster_q0": "sink on the cluster, no quorum",
                 "flat": "same on the flat workload"}  # fmt: skip
        cols = [k for k in names if any(x.startswith(k + "_") for r in rat.values() for x in r)]
        lines += [
            "| sink / other: steady; wall | " + " | ".join(names[k] for k in cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for sink, r in rat.items():
            cells = []
            for k in cols:
                steady, wall = r.get(k + "_steady"), r.get(k + "_wall")
                cpu = r.get("flat_cpu") if k == "flat" else None
                cells.append(
                    "\u2013"
                    if steady is None and wall is None
                    else f"{'n/a' if steady is None else f'{steady:.2f}'}; "
                    f"{'n/a' if wall is None else f'{wall:.2f}'}"
                    + ("" if cpu is None else f" (CPU/event {cpu:.2f})")
                )  # fmt: skip
            lines.append(f"| {title(sink)} | " + " | ".join(cells) + " |")
        lines.append("")
    loads = meta.get("loads") or {"flat": load}
    for shape in SHAPES:
        peers = [r for r in doc["raw"].get(prefix(shape) + "peer", []) if not r.get("error")]
        if not peers or shape not in loads:
            continue
        p = peers[-1]
        lost = [r["lost"] for r in peers if r.get("lost")]
        lines += [
            f"The peer on the {shape} workload wrote {p.get('rows', 0):,} rows for "
            f"{p.get('records', 0):,} records ({p.get('flagged_invalid', 0):,} flagged invalid; "
            f"{loads[shape]['duplicates']:,} duplicates kept: no de-duplication)."
            + (
                " Its rows became visible all at once (the first poll that saw any saw them "
                "all), so only its wall time means something."
                if all(not r.get("steady_records") for r in peers)
                else ""
            )
            + (
                f" It lost records in {len(lost)} of {len(peers)} run(s) "
                f"({', '.join(map(str, lost))} never arrived; timed until the last row arrived)."
                if lost
                else ""
            ),
            "",
        ]
    sinks = [
        (prefix(w) + k, r) for w in SHAPES for k in SINKS for r in doc["raw"].get(prefix(w) + k, [])
    ]
    if sinks:
        lines += [
            "Inside the sink runs (from the worker's log and /metrics):",
            "",
            "| run | start-up s (to first landed) | batches | first batch flush s | "
            "median flush s | dedup s (sum) | insert s (sum) | rebalances |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, r in sinks:
            if r.get("error"):
                lines.append(f"| {r.get('label', key)} | failed: {r['error'][:80]} |||||||")
                continue
            b = r.get("batches") or []
            secs = sorted(x["seconds"] for x in b if x.get("seconds") is not None)
            m = r.get("worker_metrics") or {}
            first = f"{b[0]['seconds']:.2f}" if b else "-"
            med = f"{secs[len(secs) // 2]:.2f}" if secs else "-"
            lines.append(
                f"| {r['label']} | {r.get('startup_s') or 0:.1f} | {len(b)} | {first} | {med} | "
                f"{m.get('sink_dedup_seconds_sum', 0):.1f} | "
                f"{m.get('sink_insert_seconds_sum', 0):.1f} | "
                f"{m.get('sink_rebalances_total', 0):.0f} |"
            )
        lines.append("")
    lat = doc.get("latency")
    if lat:
        lines += [
            f"End-to-end delay at {lat['rate']:,.0f} records/s offered (half the measured "
            f"1-worker steady rate), {lat['seconds']:.0f} s per run, one worker:",
            "",
            "| run | offered/s | records | p50 s | p99 s | max s | worker histogram p50/p99 "
            "(bucket bounds) | stored_at - Kafka ts p50/p99 (1 s resolution) |",
            "|---|---:|---:|---:|---:|---:|---|---|",
        ]
        for i, r in enumerate(lat["runs"]):
            if r.get("p50_s") is None:
                lines.append(f"| {i} | - | - | - | - | - | {r.get('error', 'failed')} | |")
                continue
            h = r.get("worker_histogram") or {}
            st = r.get("stored_at_minus_kafka_ts_s") or {}
            lines.append(
                f"| {i} | {r['offered_rate']:,.0f} | {r['measured']:,} | {r['p50_s']:.3f} | "
                f"{r['p99_s']:.3f} | {r['max_s']:.3f} | {h.get('p50', '-')} / "
                f"{h.get('p99', '-')} | {st.get('p50', '-')} / {st.get('p99', '-')} |"
            )
        ls = lat.get("summary") or {}
        if ls.get("p50_s"):
            lines += [
                "",
                f"Median over runs: p50 {ls['p50_s']['median']:.3f} s, "
                f"p99 {ls['p99_s']['median']:.3f} s.",
            ]
        lines += [
            "",
            "Delay of a record = the first poll of `sink_offsets` (every "
            f"{lat['runs'][0].get('poll_interval_s', 0.05) * 1000:.0f} ms) that shows its "
            "offset landed, minus the wall-clock time it was appended to its producer batch "
            "(its Kafka timestamp); the landed offset moves in the same INSERT as the rows. "
            "Resolution: the poll interval plus one query "
            f"(median {1000 * (lat['runs'][0].get('poll_query_s_median') or 0):.0f} ms).",
            "",
        ]
    exact = doc.get("exactness") or []
    if exact:
        lines += [
            "Exactness of the sink's raw table after every run:",
            "",
            "| run | rows | expected | distinct (ns, source, id) | distinct offsets | missing "
            "| unexpected | dead letters / invalid sent | result | note |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for e in exact:
            x = e["exact"]
            lines.append(
                f"| {e['label']} | {x['rows']:,} | {x['expected']:,} | "
                f"{x['distinct_identities']:,} | {x['distinct_offsets']:,} | {x['missing']} | "
                f"{x['unexpected']} | {x.get('dead_letters', '-')} / {x.get('invalid_sent', '-')}"
                f" | {'exact' if x['ok'] else '**NOT EXACT**'} | "
                f"{'disturbed: ' + '; '.join(e['disturbed']) if e.get('disturbed') else ''} |"
            )
        lines.append("")
    if doc.get("profile_md"):
        lines += ["## Profile of one worker (py-spy)", "", doc["profile_md"]]
    if doc.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    return "\n".join(lines)


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    agg = doc["aggregate"]
    keys = [k for k in workload_keys(agg) if agg[k].get("steady") or agg[k].get("wall")]
    if not keys:
        return
    labels = {
        "consume": "consume\nceiling",
        "insert": "insert\nceiling",
        "sink_w1": "sink\n1 worker",
        "sink_w2": "sink\n2 workers",
        "sink_cluster": "sink on 2x2\ncluster, quorum",
        "sink_cluster_q0": "sink on 2x2\ncluster, no quorum",
        "peer": "ClickHouse\nKafka engine",
        "naive": "naive\nper-record",
    }
    for key in keys:  # the other workloads' contenders, marked
        for shape in SHAPES[1:]:
            if key.startswith(prefix(shape)):
                labels[key] = f"[{shape}]\n" + labels[key[len(prefix(shape)) :]]
    fig, ax = plt.subplots(figsize=(max(9.0, 1.1 * len(keys)), 4.8))
    width = 0.38
    xs = range(len(keys))
    for offset, kind, color in ((-width / 2, "steady", "#2b6cb0"), (width / 2, "wall", "#a0aec0")):
        med = [agg[k][kind]["median"] if agg[k].get(kind) else 0 for k in keys]
        low = [med[i] - agg[k][kind]["min"] if agg[k].get(kind) else 0 for i, k in enumerate(keys)]
        high = [agg[k][kind]["max"] - med[i] if agg[k].get(kind) else 0 for i, k in enumerate(keys)]
        bars = ax.bar([x + offset for x in xs], med, width, yerr=[low, high], capsize=3,
                      color=color, label=f"{kind} (median, min\u2013max)")  # fmt: skip
        for bar, value in zip(bars, med, strict=True):
            if value:
                ax.annotate(f"{value / 1000:,.1f}k", (bar.get_x() + bar.get_width() / 2, value),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                            textcoords="offset points")  # fmt: skip
    for k in keys:
        if any("exact" in r and not r["exact"]["ok"] for r in doc["raw"].get(k, [])):
            labels[k] += "\n(NOT EXACT)"
    ax.set_xticks(list(xs), [labels[k] for k in keys])
    ax.set_ylabel("events per second")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    meta = doc["meta"]
    ax.set_title(
        f"{meta['load']['records']:,} events, {meta['runs']} run(s), {meta['cpus']} shared CPUs, "
        f"ClickHouse {meta['clickhouse']}",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(doc: dict[str, Any], publish: bool) -> dict[str, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": RESULTS / "latest.json",
        "md": RESULTS / "latest.md",
        "png": RESULTS / "latest.png",
    }
    paths["json"].write_text(json.dumps(doc, indent=2, default=str))
    # Every run is also kept under its tag (latest.* are overwritten by the next run).
    history = RESULTS / "runs"
    history.mkdir(exist_ok=True)
    shutil.copy(paths["json"], history / f"{doc['meta'].get('tag', 'unknown')}.json")
    paths["md"].write_text(markdown(doc))
    chart(doc, paths["png"])
    if publish:
        REPORT.mkdir(parents=True, exist_ok=True)
        for key in ("md", "png", "json"):
            if paths[key].exists():
                shutil.copy(paths[key], REPORT / f"latest.{key}")
        profile = RESULTS / "profile.txt"
        if profile.exists() and doc.get("profile_md"):
            (REPORT / "profile.md").write_text(doc["profile_md"])
    return paths


def main(argv: list[str] | None = None) -> int:
    """Re-render results/latest.json (and re-summarise results/profile.txt) without
    measuring again: `python -m benchmarks.report [--publish]`."""
    import argparse

    from benchmarks import profiling

    parser = argparse.ArgumentParser(prog="benchmarks.report", description=main.__doc__)
    parser.add_argument("--publish", action="store_true")
    args = parser.parse_args(argv)
    doc = json.loads((RESULTS / "latest.json").read_text())
    doc["aggregate"] = aggregate(doc["raw"])
    doc["ratios"] = ratios(doc["aggregate"])
    profile = RESULTS / "profile.txt"
    if doc.get("profile") and profile.exists():
        summary_ = profiling.summarise(profile)
        run = doc["profile"].get("run") or {}
        tail = doc.get("profile_md", "").split("\nProfiled run:", 1)
        doc["profile"]["summary"] = summary_
        doc["profile_md"] = profiling.markdown(summary_, run.get("wall_s")) + (
            "\nProfiled run:" + tail[1] if len(tail) == 2 else ""
        )
        (RESULTS / "profile.md").write_text(doc["profile_md"])
    write(doc, args.publish)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
