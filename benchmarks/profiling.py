"""Where the worker's CPU time goes: summarise a py-spy raw (collapsed stacks) profile.

Each on-CPU sample is charged to one category, decided by the innermost frame that belongs
to a known owner (so time inside orjson, called from `sink/pipeline/decode.py`, is decode; time in
`re` or `datetime` called from there too). A few owners win from anywhere in the stack:
dead-letter sends, logging, metrics and start-up (imports, migrations)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Anywhere in the stack, outermost first.
ANCESTOR_RULES: list[tuple[str, Any]] = [
    ("start-up (imports, config, migrate)", lambda f, fn: "importlib" in f
     or (f.endswith("sink/app.py") and fn in ("migrate", "_until_up"))),
    ("dead-letter produce (DeadLetters.send)", lambda f, fn: f.endswith("sink/pipeline/consumer.py")
     and fn == "send"),
    ("logging (structlog / logging)", lambda f, fn: "/structlog/" in f or "/logging/" in f),
    ("cyclic garbage collector (runs on a clock)", lambda f, fn: f.endswith("sink/app.py")
     and fn == "_collect_garbage"),
    ("metrics + HTTP endpoints", lambda f, fn: "/prometheus_client/" in f
     or f.endswith("sink/operations/health.py")
     or f.endswith("sink/operations/metrics.py")),
]  # fmt: skip

# Innermost match wins.
LEAF_RULES: list[tuple[str, Any]] = [
    ("decode + validate (sink/pipeline/decode.py, binary.py, orjson, RFC 3339)",
     lambda f, fn: f.endswith("sink/pipeline/decode.py") or f.endswith("sink/pipeline/binary.py")),
    ("dedup: hashing, grouping, keep (sink/stores/dedup.py)", lambda f, fn: f.endswith(
        "sink/stores/dedup.py")
     and fn in ("identity_key", "coordinates", "group", "Grouping.add", "framing", "keep",
                "pending_key")),
    ("dedup: redis client (claim commands, RESP)", lambda f, fn: "/redis/" in f
     or f.endswith("sink/stores/dedup.py") or f.endswith("sink/stores/dedup_groups.py")
     or f.endswith("sink/stores/dedup_cluster.py")),
    ("column building (event_columns)", lambda f, fn: f.endswith(
        "sink/stores/clickhouse/schema.py") and fn.startswith("event_columns")),
    ("ClickHouse insert/query: asynch serialisation + protocol", lambda f, fn: "/asynch/" in f
     or "/clickhouse_driver/" in f or "sink/stores/clickhouse/" in f),
    ("Kafka fetch + record parsing (aiokafka consumer)", lambda f, fn: "/aiokafka/" in f),
    ("worker: batching, bookkeeping (worker/batch/offsets)", lambda f, fn: any(
        f.endswith(f"sink/pipeline/{m}.py") for m in ("worker", "batch", "offsets", "consumer",
                                                      "landing", "fencing", "positioning",
                                                      "retry", "intake", "flow"))),
]  # fmt: skip
EVENT_LOOP = "event loop: uvloop's C code (polling, socket reads/writes; shows as Runner.run)"


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = []
        for part in stack.split(";"):
            m = _FRAME.match(part.strip())
            file, func = (m.group("file"), m.group("func")) if m else ("", part.strip())
            if not file and func.startswith("process "):
                continue  # py-spy's per-process root frame (--subprocesses)
            if file and not file.startswith(("/", "<")):
                file = "/" + file  # py-spy shortens paths to the package: make them /pkg/...
            if file == "<string>" and func == "<lambda>":
                func = "namedtuple.__new__"
            frames.append((file, func))
        stacks.append((frames, int(count)))
    return stacks


def categorise(frames: list[tuple[str, str]]) -> str:
    if not frames:
        return "no Python frame (native code)"
    for name, rule in ANCESTOR_RULES:
        if any(rule(f, fn) for f, fn in frames):
            return name
    # asyncio's own frames (streams, transports) are charged to the library that called
    # them (redis, asynch, aiokafka); only what has no other owner is the event loop's.
    for f, fn in reversed(frames):
        if "/asyncio/" in f:
            continue
        for name, rule in LEAF_RULES:
            if rule(f, fn):
                return name
    if any("/asyncio/" in f or "uvloop" in f for f, _ in frames):
        return EVENT_LOOP
    return "other"


_ROOT = f"{Path(__file__).resolve().parents[1]}/"
"""The project's root: frames of its own files are shown from there."""


def _short(file: str) -> str:
    for marker in ("site-packages/", _ROOT, "lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def summarise(path: Path, top: int = 20) -> dict[str, Any]:
    stacks = parse(path)
    total = sum(c for _, c in stacks)
    categories: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        categories[categorise(frames)] += count
        if frames:
            f, fn = frames[-1]
            leaf[f"{fn} ({_short(f)})"] += count
        seen = set()
        for f, fn in frames:
            if "/sink/" in f:
                key = f"{fn} ({_short(f)})"
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += count
    pct = lambda c: round(100.0 * c / max(1, total), 1)  # noqa: E731
    return {
        "samples": total,
        "categories": [(name, count, pct(count)) for name, count in categories.most_common()],
        "self": [(name, count, pct(count)) for name, count in leaf.most_common(top)],
        "inclusive_sink": [(name, count, pct(count)) for name, count in inclusive.most_common(top)],
    }


def markdown(summary: dict[str, Any], seconds: float | None = None) -> str:
    lines = [f"On-CPU samples: {summary['samples']} at 100 Hz"]
    if seconds:
        lines[0] += f" over a {seconds:.1f} s run"
    lines += ["", "| where | samples | share |", "|---|---:|---:|"]
    lines += [f"| {n} | {c} | {p}% |" for n, c, p in summary["categories"]]
    lines += ["", "Top self time (innermost Python frame; C calls are charged to their caller):",
              "", "| function | samples | share |", "|---|---:|---:|"]  # fmt: skip
    lines += [f"| `{n}` | {c} | {p}% |" for n, c, p in summary["self"]]
    lines += ["", "Inclusive time of sink functions:", "", "| function | samples | share |",
              "|---|---:|---:|"]  # fmt: skip
    lines += [f"| `{n}` | {c} | {p}% |" for n, c, p in summary["inclusive_sink"]]
    return "\n".join(lines) + "\n"
