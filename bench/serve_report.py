"""The record of ``litefocus-bench serve``: its git state and versions, and its Markdown table and
PNG plot (throughput, latency and occupancy per concurrency, batching on against off).

    serve-<device>-<time>.json + .md + .png under --out (default bench/results)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

from litefocus.engine.fileio import atomic_path, atomic_write_bytes

REPO = Path(__file__).resolve().parent.parent


def git_commit() -> dict:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def versions() -> dict:
    from importlib import metadata

    from litefocus.engine.manifest import library_versions

    keep = ("litefocus", "onnxruntime", "onnxruntime-gpu", "tensorrt")
    return {**{k: v for k, v in library_versions().items() if k in keep}, "ray": metadata.version("ray")}


def _f(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def table_row(r: dict) -> str:
    per = r["unet_calls"] / r["ok"] if r["ok"] else None
    return (
        f"| {r['batching']} | {r['concurrency']} | {r['ok']} / {r['requests']} | {_f(r['requests_per_min'], '.1f')} "
        f"| {_f(r['latency_p50_s'])} | {_f(r['latency_p95_s'])} | {_f(r['occupancy'])} | {r['unet_calls']} "
        f"| {_f(per, '.1f')} | {_f(r.get('step_ms'), '.1f')} |"
    )


def render_markdown(record: dict) -> str:
    o, git = record["options"], record["git"]
    lines = [
        f"# litefocus-bench serve · {record['device']} · {record['created']}",
        "",
        f"- commit `{(git.get('commit') or 'unknown')[:12]}`{' (dirty tree)' if git.get('dirty') else ''}, "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v),
        f"- command: `{record['command']}`",
        f"- server: {o['server']}; engines `{o['engines']}`; {o['seconds']:g} s requests, {o['steps']} steps, "
        f"guidance {o['guidance']:g}; {o['requests']} requests per row",
        "",
        "| batching | clients | ok / sent | req/min | p50 s | p95 s | occupancy | UNet calls | calls per request "
        "| step ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            table_row(r)
            for r in sorted(record["rows"], key=lambda r: (r["batching"] != "on", r["concurrency"]))
        ),
        "",
    ]
    rate = {(r["batching"], r["concurrency"]): r["requests_per_min"] for r in record["rows"]}
    both = [c for (m, c), x in sorted(rate.items()) if m == "on" and x and rate.get(("off", c))]
    if both:
        ratios = ", ".join(f"{c} clients {rate['on', c] / rate['off', c]:.2f}x" for c in both)
        lines += [f"Throughput, batching on / off: {ratios}", ""]
    failed = [f"{r['batching']} at {r['concurrency']} clients: {r['statuses']}" for r in record["rows"]]
    failed = [f for f, r in zip(failed, record["rows"], strict=True) if r["ok"] < r["requests"]]
    lines += [f"Not all requests succeeded: {'; '.join(failed)}", ""] if failed else []
    lines.append(
        "occupancy: request rows / rows of the engine batches that ran (a guided request is 2 rows; "
        "padding up to the exported batch size counts as unused)."
    )
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_l, ax_o) = plt.subplots(1, 3, figsize=(15, 4.5))
    for i, mode in enumerate(("on", "off")):
        rows = sorted((r for r in record["rows"] if r["batching"] == mode), key=lambda r: r["concurrency"])
        if not rows:
            continue
        c = [r["concurrency"] for r in rows]
        style = {"color": f"C{i}", "marker": "os"[i]}
        ax_t.plot(c, [r["requests_per_min"] or 0 for r in rows], label=f"batching {mode}", **style)
        ax_l.plot(c, [r["latency_p50_s"] or np.nan for r in rows], label=f"{mode} p50", **style)
        ax_l.plot(c, [r["latency_p95_s"] or np.nan for r in rows], ls="--", label=f"{mode} p95", **style)
        ax_o.plot(c, [r["occupancy"] or np.nan for r in rows], label=f"batching {mode}", **style)
    ax_t.set(xlabel="concurrent clients", ylabel="requests / minute", title="throughput")
    ax_l.set(xlabel="concurrent clients", ylabel="seconds", title="latency")
    ax_o.set(xlabel="concurrent clients", ylabel="rows used / rows run", title="occupancy", ylim=(0, 1.05))
    for ax in (ax_t, ax_l, ax_o):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"litefocus-bench serve · {record['device']} · {record['created']}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def write_outputs(record: dict, out: Path) -> tuple[Path, Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"serve-{record['device_type']}-{record['created']}"
    path = stem.with_suffix(".json")
    atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())
    md = stem.with_suffix(".md")
    atomic_write_bytes(md, render_markdown(record).encode())
    return path, md, plot(record, stem.with_suffix(".png"))
