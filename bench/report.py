"""Render run records (JSON) as a Markdown table and a PNG plot; compare several runs; tabulate decode.

Everything here is a pure function of the records: ``litefocus-bench report FILE...`` re-renders
exactly what the run itself wrote. Speedups are ratios inside one run (same machine, same process).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from litefocus.bench.record import ROW_FIELDS, SCHEMA_VERSION
from litefocus.engine.fileio import atomic_path, atomic_write_bytes

BASELINE = "diffusers"
BACKEND_ORDER = (
    "diffusers",
    "diffusers-compile",
    "litefocus",
    "litefocus-compile",
    "onnxruntime",
    "tensorrt",
)


def load_record(path: str | Path) -> dict:
    """A run record, checked: clear errors for a missing file, bad JSON or a row without a field."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; pass JSON files written by litefocus-bench") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a litefocus-bench JSON record ({e})") from None
    if not isinstance(record, dict):
        raise ValueError(
            f"{path}: not a litefocus-bench record (a JSON {type(record).__name__}, not an object)"
        )
    if record.get("benchmark") != "litefocus-bench":
        raise ValueError(f"{path}: not a litefocus-bench record (benchmark={record.get('benchmark')!r})")
    if record.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {record.get('schema_version')!r}, this litefocus reads {SCHEMA_VERSION}"
        )
    for i, row in enumerate(record.get("rows", [])):
        missing = [f for f in ROW_FIELDS if f not in row]
        if missing:
            raise ValueError(f"{path}: row {i} ({row.get('backend')}) lacks {', '.join(missing)}")
    return record


def speedups(record: dict) -> dict[tuple[str, float, str], float]:
    """(backend, seconds, precision) -> diffusers' median step / this row's, within this record."""
    base = {
        (r["seconds"], r["precision"]): r["step_ms_p50"] for r in record["rows"] if r["backend"] == BASELINE
    }
    out = {}
    for r in record["rows"]:
        ref = base.get((r["seconds"], r["precision"]))
        if ref is not None:
            out[backend_label(r), r["seconds"], r["precision"]] = ref / r["step_ms_p50"]
    return out


def _sorted_rows(rows: list[dict]) -> list[dict]:
    def key(r):
        b = r["backend"].split(" ")[0]  # a label's backend (e.g. "litefocus-compile (reduce-overhead)")
        return (
            r["seconds"],
            r["precision"],
            BACKEND_ORDER.index(b) if b in BACKEND_ORDER else 99,
            r["backend"],
        )

    return sorted(rows, key=key)


def backend_label(row: dict) -> str:
    """The backend, with its torch.compile mode when that is not the default (e.g. CUDA graphs) and
    an engine's GPU graph form when it has one (the UNet's contrib-op pieces)."""
    mode = row.get("compile_mode")
    label = row["backend"] + (f" ({mode})" if mode not in (None, "default") else "")
    ops = (row.get("gpu_ops") or {}).get("unet")
    return label + (f" [{'+'.join(ops)}]" if ops else "")


def _fmt(x, spec: str = ".1f", none: str = "–") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def _dirty(git: dict) -> str:
    if not git.get("dirty"):
        return ""
    changed = git.get("changed")
    return f" + uncommitted changes to {', '.join(changed)}" if changed else " (dirty tree)"


def run_label(record: dict) -> str:
    commit = (record.get("git") or {}).get("commit") or "unknown"
    return f"{record['created']} · {record['device']} · {commit[:7]}"


def render_markdown(record: dict) -> str:
    """One run: context, the table, skipped rows."""
    opts, ceil = record["options"], record["matmul_ceiling"]
    v = record["versions"]
    git = record.get("git") or {}
    lines = [
        f"# litefocus-bench · {record['device']} · {record['created']}",
        "",
        f"- commit `{(git.get('commit') or 'unknown')[:12]}`{_dirty(git)}; "
        + ", ".join(f"{k} {v[k]}" for k in ("torch", "diffusers", "onnxruntime", "tensorrt") if v.get(k)),
        f"- command: `{record['command']}`",
        f"- model `{opts['source']}`, batch 2 (CFG), T5 length {opts['text_len']}, LiteFocus "
        f"r = {opts['litefocus']['sparse_ratio']} at F = {opts['litefocus']['freq_bins']}; "
        f"{opts['warmup']} warm-up + {opts['repeats']} timed steps; generation = {opts['steps']} "
        f"{opts.get('scheduler', 'ddim').upper()} steps + decode"
        + (f" at {', '.join(f'{x:g}' for x in opts['generate_at'])} s" if opts.get("generate_at") else "")
        + (
            f"; decode alone: {opts['decode_warmup']} warm-up + {opts['decode_repeats']} timed calls"
            if opts.get("decode_repeats")
            else ""
        ),
        f"- dense matmul ceiling: {ceil['tflops']:.3f} TFLOP/s ({ceil['dtype']}, {ceil['n']}³)",
        "",
        "| seconds | backend | precision | step p50 ms | p10 – p90 ms | vs diffusers | compile s "
        "| generate s | peak MB | decode s | decode MB | GFLOP/step | TFLOP/s | % of ceiling |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sp = speedups(record)
    for r in _sorted_rows(record["rows"]):
        s = sp.get((backend_label(r), r["seconds"], r["precision"]))
        lines.append(
            f"| {r['seconds']:g} | {backend_label(r)} | {r['precision']} | {_fmt(r['step_ms_p50'])} "
            f"| {_fmt(r['step_ms_p10'])} – {_fmt(r['step_ms_p90'])} | {_fmt(s, '.2f')}{'x' if s else ''} "
            f"| {_fmt(r.get('compile_s'))} | {_fmt(r['generate_s'])} | {_fmt(r['peak_mem_mb'], '.0f')} "
            f"| {_fmt(_decode_s(r), '.3f')} | {_fmt(r.get('decode_mem_delta_mb'), '.0f')} "
            f"| {_fmt(r['step_gflop'], '.4g')} | {_fmt(r['achieved_tflops'], '.3f')} "
            f"| {_fmt(100 * r['ceiling_fraction'] if r.get('ceiling_fraction') is not None else None)} |"
        )
    if record.get("skipped"):
        lines += ["", "Not measured:", ""]
        for s in record["skipped"]:
            lines.append(f"- {s['backend']} at {s['seconds']:g} s: {s['status']} ({s['reason']})")
    kinds = ", ".join(sorted({r["mem_kind"] for r in record["rows"]}))
    if any("decode_repeats" in r for r in record["rows"]):  # since the decode stage: steps only
        legend = (
            f"peak MB: {kinds} during the UNet steps only (setup, compilation, decode and generation "
            "excluded). decode s: median decode call (VAE decoder + vocoder, batch 1) on a random latent; "
            "decode MB: its peak minus what was resident when it started (its own working memory). "
            "compile s: first call minus one warm step."
        )
    else:  # older records: one peak over the steps and the generation
        legend = (
            f"peak MB: {kinds} during the timed steps and the generation (setup and compilation "
            "excluded). compile s: first call minus one warm step."
        )
    lines += ["", legend]
    return "\n".join(lines) + "\n"


def _decode_s(row: dict) -> float | None:
    ms = row.get("decode_ms_p50")
    return None if ms is None else ms / 1e3


def _has_decode(row: dict) -> bool:
    return row.get("decode_ms_p50") is not None or row.get("decode_peak_mem_mb") is not None


def render_decode_table(records: list[dict]) -> str:
    """Decode per bucket: one row per audio length; per backend (and run, with several records) the
    median decode s, its working memory (peak minus the resident baseline) and its absolute peak;
    last, the onnxruntime decode's working MB per second of audio (flat when memory grows linearly).
    An empty string when no row measured the decode (records from before the decode stage)."""
    many = len(records) > 1
    cells: dict[tuple[int, str, float], dict] = {}
    for i, record in enumerate(records):
        for r in record["rows"]:
            if _has_decode(r):
                cells[i, backend_label(r), r["seconds"]] = r
    if not cells:
        return ""

    def order(col):
        backend = col[1].split(" ")[0]
        return (col[0], BACKEND_ORDER.index(backend) if backend in BACKEND_ORDER else 99, col[1])

    cols = sorted({(i, label) for i, label, _ in cells}, key=order)
    name = {c: (f"run {c[0] + 1} " if many else "") + c[1] for c in cols}
    per_s = [c for c in cols if c[1].split(" ")[0] == "onnxruntime"]
    head = ["seconds"] + [f"{name[c]} {h}" for c in cols for h in ("decode s", "decode MB", "peak MB")]
    head += [f"{name[c]} MB per s of audio" if len(per_s) > 1 else "MB per s of audio" for c in per_s]
    lines = ["## Decode per bucket", "", "| " + " | ".join(head) + " |", "|---:" * len(head) + "|"]
    for seconds in sorted({k[2] for k in cells}):
        out = [f"{seconds:g}"]
        for c in cols:
            r = cells.get((*c, seconds), {})
            out += [
                _fmt(_decode_s(r), ".3f"),
                _fmt(r.get("decode_mem_delta_mb"), ".0f"),
                _fmt(r.get("decode_peak_mem_mb"), ".0f"),
            ]
        for c in per_s:
            delta = cells.get((*c, seconds), {}).get("decode_mem_delta_mb")
            out.append(_fmt(None if delta is None else delta / seconds, ".1f"))
        lines.append("| " + " | ".join(out) + " |")
    kinds = sorted({r.get("mem_kind") or "?" for r in cells.values()})
    lines += [
        "",
        "decode s: median decode call (VAE decoder + vocoder, batch 1) on a seeded random latent. decode MB: "
        "the decode's peak minus what was resident when it started (its own working memory); peak MB: the "
        f"absolute peak ({', '.join(kinds)}). MB per s of audio: onnxruntime's decode MB / seconds.",
    ]
    return "\n".join(lines) + "\n"


def render_comparison(records: list[dict]) -> str:
    """Several runs side by side: median step per (backend, seconds, precision), and its ratio to run 1."""
    labels = [run_label(r) for r in records]
    lines = ["# litefocus-bench comparison", ""]
    lines += [f"{i + 1}. {label}" for i, label in enumerate(labels)]
    head = "| seconds | backend | precision | " + " | ".join(f"run {i + 1} ms" for i in range(len(records)))
    head += " | " + " | ".join(f"run {i + 1} / run 1" for i in range(1, len(records))) + " |"
    lines += ["", head, "|---:|---|---|" + "---:|" * (2 * len(records) - 1)]
    keys = {(backend_label(r), r["seconds"], r["precision"]) for rec in records for r in rec["rows"]}
    by_run = [{(backend_label(r), r["seconds"], r["precision"]): r for r in rec["rows"]} for rec in records]
    rows = _sorted_rows([{"backend": b, "seconds": s, "precision": p} for b, s, p in keys])
    for k in ((r["backend"], r["seconds"], r["precision"]) for r in rows):
        ms = [run.get(k, {}).get("step_ms_p50") for run in by_run]
        ratios = [m / ms[0] if m is not None and ms[0] else None for m in ms[1:]]
        lines.append(
            f"| {k[1]:g} | {k[0]} | {k[2]} | "
            + " | ".join(_fmt(m) for m in ms)
            + " | "
            + " | ".join(_fmt(x, ".2f") for x in ratios)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> Path:
    """PNG: median step time vs audio length per backend (log-log, p10-p90 bars), and the speedup
    over diffusers in the same run."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.8))
    many = len(records) > 1
    for i, record in enumerate(records):
        sp = speedups(record)
        for label in sorted(
            {backend_label(r) for r in record["rows"]}, key=lambda b: (b not in BACKEND_ORDER, b)
        ):
            backend = label.split(" ")[0]
            of_label = [r for r in record["rows"] if backend_label(r) == label]
            for precision in sorted({r["precision"] for r in of_label}):
                rs = sorted((r for r in of_label if r["precision"] == precision), key=lambda r: r["seconds"])
                name = f"{label} {precision}" + (f" (run {i + 1})" if many else "")
                # one colour per backend, one line style / marker per run
                style = {
                    "color": f"C{BACKEND_ORDER.index(backend) if backend in BACKEND_ORDER else 9}",
                    "ls": ("-", "--", ":", "-.")[(i + (label != backend)) % 4],
                    "marker": "osD^v"[(i + (label != backend)) % 5],
                    "label": name,
                }
                x = [r["seconds"] for r in rs]
                y = [r["step_ms_p50"] for r in rs]
                err = [
                    [r["step_ms_p50"] - r["step_ms_p10"] for r in rs],
                    [r["step_ms_p90"] - r["step_ms_p50"] for r in rs],
                ]
                ax_t.errorbar(x, y, yerr=err, capsize=3, **style)
                s = [(r["seconds"], sp.get((label, r["seconds"], precision))) for r in rs]
                s = [(a, b) for a, b in s if b is not None]
                if s:
                    ax_s.plot([a for a, _ in s], [b for _, b in s], **style)
    ax_t.set(xscale="log", yscale="log", xlabel="audio seconds", ylabel="UNet step, median ms (batch 2)")
    ax_t.set_title("latency per UNet step")
    ax_s.set(xscale="log", xlabel="audio seconds", ylabel=f"speedup over {BASELINE} (same run)")
    ax_s.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_s.set_title("speedup vs diffusers eager")
    seconds = sorted({r["seconds"] for rec in records for r in rec["rows"]})
    for ax in (ax_t, ax_s):
        ax.set_xticks(seconds, [f"{s:g}" for s in seconds])  # the measured lengths, in plain numbers
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(" | ".join(run_label(r) for r in records), fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def render_report(records: list[dict]) -> str:
    """The Markdown of ``write_report``: one run's table (or the comparison and every run's table),
    then the decode table when any row measured the decode."""
    if len(records) == 1:
        md = render_markdown(records[0])
    else:
        md = render_comparison(records) + "".join("\n" + render_markdown(r) for r in records)
    decode = render_decode_table(records)
    return md + ("\n" + decode if decode else "")


def write_report(records: list[dict], stem: Path) -> tuple[Path, Path]:
    """``stem``.md and ``stem``.png for one record (its table) or several (comparison + tables), the
    decode table appended to the Markdown (``render_report``)."""
    md = render_report(records)
    md_path, png_path = stem.with_suffix(".md"), stem.with_suffix(".png")
    atomic_write_bytes(md_path, md.encode())
    plot(records, png_path)
    return md_path, png_path
