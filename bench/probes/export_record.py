"""An export's record for bench/results: one entry's validation, timings and decode chunking from the
engine directory's manifest, with the wall time and peak resident set that ``/usr/bin/time -v``
printed for the export (the "Export" rows of bench/README.md, "Long audio").

    /usr/bin/time -v litefocus-export --seconds 320 --random-weights --out DIR > export.log 2>&1
    python -m litefocus.bench.probes.export_record DIR 320s-fp32 export.log --commit f928a8b
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import re
from pathlib import Path

from litefocus.bench.measure import cpu_ort_record, write_json
from litefocus.engine.entries import Entry, load_manifest
from litefocus.engine.manifest import ManifestError

logger = logging.getLogger(__name__)
DEFAULT_OUT = Path("bench/results")
MAX_LOG_BYTES = 1 << 24  # a tqdm-heavy export log is ~10 kB; refuse anything absurd
TIME_FIELDS = {  # /usr/bin/time -v line -> record key
    "Command being timed": "command",
    "Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall",
    "Maximum resident set size (kbytes)": "max_rss_kib",
    "Exit status": "exit_status",
}


def parse_time_v(text: str) -> dict:
    """The fields of ``TIME_FIELDS`` from GNU time's ``-v`` report (the last one in ``text``)."""
    found = {}
    for label, key in TIME_FIELDS.items():
        hits = re.findall(rf"^\s*{re.escape(label)}: (.+)$", text, re.M)
        if hits:
            found[key] = hits[-1].strip().strip('"')
    missing = [label for label, key in TIME_FIELDS.items() if key not in found]
    if missing:
        raise ValueError(f"no '{missing[0]}' line: run the export under /usr/bin/time -v and pass its log")
    if "litefocus-export" not in found["command"]:
        raise ValueError(
            f"its timed command is {found['command'][:80]!r}, not litefocus-export: pass the export's log"
        )
    found["max_rss_kib"] = int(found["max_rss_kib"])
    found["exit_status"] = int(found["exit_status"])
    return found


def wall_seconds(wall: str) -> float:
    """GNU time's ``h:mm:ss`` or ``m:ss.ss`` in seconds."""
    seconds = 0.0
    for part in wall.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def export_record(entry: Entry, time_v: dict) -> dict:
    """What the export of ``entry`` measured: GNU time's numbers, then per module its graph
    form, validation, tolerance and seconds (and the decode's chunking error when it is windowed)."""
    raw = entry.raw
    modules = {k: m.raw for k, m in entry.modules.items()}
    ended = dt.datetime.strptime(raw["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    started = ended - dt.timedelta(seconds=wall_seconds(time_v["wall"]))
    record = {
        "entry": entry.name,
        "export_command": time_v["command"],
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ended": raw["created"],
        "exit_status": time_v["exit_status"],
        "wall": time_v["wall"],
        "max_rss_kib": time_v["max_rss_kib"],
        "max_rss_gib": round(time_v["max_rss_kib"] / 2**20, 2),
        "versions": raw["versions"],
        "attention": {k: m.get("attention") for k, m in modules.items()},
        "conv": {k: m.get("conv") for k, m in modules.items()},
        "validation": {k: m["validation"]["outputs"] for k, m in modules.items()},
        "tolerance": {k: m["validation"]["tolerance"] for k, m in modules.items()},
        "build_seconds": raw["build_seconds"],
        "export_seconds": {k: m["export_seconds"] for k, m in modules.items()},
        "validation_seconds": {k: m["validation"]["seconds"] for k, m in modules.items()},
    }
    if "chunking" in modules.get("decode", {}):
        record["decode_chunking"] = modules["decode"]["chunking"]
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engine_dir", type=Path, help="the directory litefocus-export wrote")
    p.add_argument("entry", help="the manifest entry, e.g. 320s-fp32")
    p.add_argument("time_log", type=Path, help="the export's log with /usr/bin/time -v's report at its end")
    p.add_argument("--commit", required=True, help="the commit the export ran (recorded as given)")
    p.add_argument(
        "--note", default="", help="what else the reader should know (e.g. 'machine otherwise idle')"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON file")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        manifest = load_manifest(args.engine_dir)
    except ManifestError as e:
        p.error(str(e))
    if args.entry not in manifest.entries:
        p.error(
            f"entry {args.entry!r} is not in {args.engine_dir}; it has {', '.join(sorted(manifest.entries))}"
        )
    if not args.time_log.is_file() or args.time_log.stat().st_size > MAX_LOG_BYTES:
        p.error(f"{args.time_log} is not a log file (at most {MAX_LOG_BYTES} bytes); pass the export's log")
    try:
        time_v = parse_time_v(args.time_log.read_text(errors="replace"))
    except ValueError as e:
        p.error(f"{args.time_log}: {e}")
    record = {
        **cpu_ort_record("export-memory", "litefocus.bench.probes.export_record", argv),
        "commit": args.commit,
        "note": args.note,
        **export_record(manifest.entries[args.entry], time_v),
    }
    stamp = record["started"].replace("-", "").replace(":", "")
    write_json(args.out, f"export-cpu-{stamp}-{args.entry}.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
