"""The prepared GPU measurement: phases of ``litefocus-bench`` runs, each under a time budget.

A lent GPU machine is bare, air-gapped and held for minutes, so what runs there is fixed here and
rehearsed without a GPU (``check``). ``bench/gpu/run.sh`` installs the carried wheels and calls:

    python -m litefocus.bench.gpu_plan run --phase A --out "$OUT"     # on the GPU machine
    python -m litefocus.bench.gpu_plan check --out DIR                 # anywhere: the dry run

Each run is one ``litefocus-bench`` process with ``timeout``-like handling: it gets SIGTERM at the
end of its share of the phase budget (the bench then records the rest as skipped, status ``budget``,
and writes what it measured), and SIGKILL 20 s later. Results go to a scratch directory; ``$OUT``
receives only what the lent machine can send back (at most 8 plain files): each run's JSON, one
combined Markdown table, one plot and the log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from litefocus.engine.contract import GPU_OPS

logger = logging.getLogger("litefocus.bench.gpu_plan")

MAX_OUT_FILES = 8  # what the lent machine sends back: at most 8 files, 16 MiB each
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
KILL_AFTER_S = 20  # SIGKILL this long after SIGTERM
MIN_RUN_S = 30  # a run with less time left than this is not started
# one device command runs at most 600 s; the wheels' install and the start take up to ~90 s of it
MAX_PHASE_S = 510  # the phase's runs plus what run.sh adds after it
PROFILE_S = 70  # run.sh C's kernel profile: timeout -k 10 60
COMMON = ("--device", "cuda", "--precision", "fp16")
ENGINES = "/tmp/litefocus-engines"  # survives between commands on one warm machine
GPU_FORM = GPU_OPS  # phase C: every piece of export/gpu_form.py


@dataclass(frozen=True)
class Run:
    name: str
    args: tuple[str, ...]
    cap_s: float  # at most this much of the phase budget


def ablation(piece: str, cap_s: float = 65) -> Run:
    """Phase C: the 80 s engine exported with one GPU form (``--gpu-ops piece``) into its own folder,
    its step with CUDA graphs off and on, beside eager diffusers."""
    return Run(
        f"ablation-{piece}",
        (
            "--backends", "diffusers", "onnxruntime", "onnxruntime-cudagraph", "--gpu-ops", piece,
            "--seconds", "80", "--steps", "0", "--warmup", "3", "--repeats", "10",
            "--engines", f"{ENGINES}-{piece}",
        ),
        cap_s,
    )  # fmt: skip


@dataclass(frozen=True)
class Phase:
    name: str
    budget_s: float
    runs: tuple[Run, ...]
    what: str
    extra: tuple[str, ...] = ()  # files run.sh adds to $OUT after the phase (e.g. a kernel profile)


PHASES = {
    # measured on the first H100 (2026-11-27): one torch.compile of the full UNet takes 89-117 s on
    # that machine's 16 cores, so two compiles fit one run and one phase, not four
    "A": Phase(
        "A",
        360,
        (
            Run(
                "eager",
                (
                    "--backends", "diffusers", "litefocus",
                    "--seconds", "10", "40", "80", "160",
                    "--steps", "25", "--scheduler", "dpm++", "--generate-at", "80",
                    "--warmup", "3", "--repeats", "10",
                ),
                80,
            ),
            Run(
                "cudagraph",
                (
                    "--backends", "diffusers", "litefocus-compile", "diffusers-compile",
                    "--compile-mode", "reduce-overhead",
                    "--seconds", "80", "--steps", "0", "--warmup", "3", "--repeats", "10",
                ),
                280,
            ),
        ),
        "PyTorch fp16: eager at 10-160 s (+ a 25-step DPM++ generation with decode at 80 s), and "
        "torch.compile with CUDA graphs (reduce-overhead) at 80 s",
    ),
    "A2": Phase(
        "A2",
        300,
        (
            Run(
                "compile",
                (
                    "--backends", "diffusers", "litefocus-compile", "diffusers-compile",
                    "--seconds", "80", "--steps", "0", "--warmup", "2", "--repeats", "10",
                ),
                300,
            ),
        ),
        "PyTorch fp16: torch.compile (default mode, no CUDA graphs) at 80 s",
    ),
    # the exported attention is fused (com.microsoft.MultiHeadAttention): 160 s after
    # 80 s shows how the engine's step and decode grow with length on the CUDA EP
    "B": Phase(
        "B",
        420,
        (
            Run(
                "onnxruntime",
                (
                    "--backends", "diffusers", "onnxruntime",
                    "--seconds", "80", "160", "--steps", "25", "--scheduler", "dpm++",
                    "--warmup", "3", "--repeats", "10", "--engines", ENGINES,
                ),
                420,
            ),
        ),
        "the fp16 exports of the 80 and 160 s buckets (fused attention, validated against PyTorch on "
        "the CUDA EP), then ONNX Runtime CUDA EP with IO binding at 80 and 160 s",
    ),
    # the GPU graph form (export/gpu_form.py) against torch.compile with CUDA graphs, in one
    # process: the engine with CUDA graphs on and off, decode per backend, 25-step DPM++ generations at 80
    # and 160 s; then the form's pieces one by one (each run exports its own engines), as ONNX Runtime's
    # Stable Diffusion ablation did. Every run repeats diffusers eager, so each ratio is in one process.
    "C": Phase(
        "C",
        400,
        (
            Run(
                "engine80",
                (
                    "--backends", "diffusers", "litefocus-compile", "onnxruntime", "onnxruntime-cudagraph",
                    "--compile-mode", "reduce-overhead", "--gpu-ops", *GPU_FORM,
                    "--seconds", "80", "--steps", "25", "--scheduler", "dpm++",
                    "--warmup", "3", "--repeats", "10", "--engines", ENGINES,
                ),
                180,
            ),
            Run(
                "engine160",
                (
                    "--backends", "diffusers", "onnxruntime", "onnxruntime-cudagraph", "--gpu-ops", *GPU_FORM,
                    "--seconds", "160", "--steps", "25", "--scheduler", "dpm++",
                    "--warmup", "3", "--repeats", "10", "--engines", ENGINES,
                ),
                90,
            ),
            ablation("none"),
            ablation("nhwc"),
        ),
        "the GPU-form fp16 engine (CUDA graphs on and off) against litefocus-compile with CUDA "
        "graphs at 80 s, 25-step DPM++ generations at 80 and 160 s, and the form's pieces one by one",
        ("profile-cuda-80s.json",),  # bench/gpu/profile_engine.py on the 80 s engine, after the phase
    ),
}  # fmt: skip


REHEARSE_ENV = "LITEFOCUS_GPU_REHEARSE"  # =1: the same plan on CPU with the tiny model (see README)


def bench_argv(run: Run, results: Path, device: str = "cuda") -> list[str]:
    if os.environ.get(REHEARSE_ENV) == "1":  # every length becomes the tiny model's 5 s
        args, in_seconds = [], False
        for a in run.args:
            if a.startswith("--"):
                in_seconds = a in ("--seconds", "--generate-at")
                args += [a, "5"] if in_seconds else [a]
            elif not in_seconds:
                args.append(a)
        common = ["--device", "cpu", "--precision", "fp32", "--preset", "tiny", "--text-len", "16"]
        return [*common, *args, "--out", str(results)]
    common = list(COMMON) if device == "cuda" else ["--device", device, "--precision", "fp32"]
    return [*common, *run.args, "--out", str(results)]


def output_names(phase: Phase) -> list[str]:
    """What one phase leaves in $OUT: each run's JSON, the combined table and plot, the log."""
    return [f"{phase.name}-{r.name}.json" for r in phase.runs] + [
        f"{phase.name}.md",
        f"{phase.name}.png",
        f"{phase.name}.log",
        *phase.extra,
    ]


def check(out: Path) -> list[str]:
    """The dry run: every run's arguments parse and validate, and the outputs fit what comes back.

    Returns the problems found (empty: all good). The arguments are checked with ``--device cpu``
    (CUDA is checked on the GPU machine itself); the output directory must be writable.
    """
    from litefocus.bench.cli import UsageError, build_run_parser, options_from_args

    problems = []
    for phase in PHASES.values():
        names = output_names(phase)
        if len(names) > MAX_OUT_FILES:
            problems.append(
                f"phase {phase.name}: {len(names)} output files, at most {MAX_OUT_FILES} come back"
            )
        problems += [f"phase {phase.name}: bad output name {n!r}" for n in names if not OUT_NAME.match(n)]
        worst = (
            phase.budget_s + KILL_AFTER_S + PROFILE_S * bool(phase.extra)
        )  # the last run's grace, the profile
        if worst > MAX_PHASE_S:
            problems.append(f"phase {phase.name}: up to {worst:g} s, one command fits {MAX_PHASE_S} s")
        if sum(r.cap_s for r in phase.runs) < phase.budget_s * 0.5:
            problems.append(f"phase {phase.name}: run caps leave most of the budget unused")
        for run in phase.runs:
            argv = bench_argv(run, out, device="cpu")
            parser = build_run_parser()
            try:
                args = parser.parse_args(argv)
                options_from_args(args, "dry-run", Path(args.engines or ENGINES))
            except (SystemExit, UsageError) as e:
                problems.append(f"phase {phase.name} run {run.name}: {argv} is rejected ({e})")
            if "--out" in run.args or "--device" in run.args:
                problems.append(f"phase {phase.name} run {run.name}: --out/--device are set by the plan")
    return problems


def cuda_library_dirs() -> list[str]:
    """Folders of the CUDA libraries that pip's nvidia-* packages installed (for ONNX Runtime's CUDA EP)."""
    dirs = set()
    for entry in sys.path:
        root = Path(entry) / "nvidia"
        if root.is_dir():
            dirs.update(str(p.parent) for p in root.rglob("lib*.so*") if p.parent.name in ("lib", "lib64"))
    return sorted(dirs)


def run_one(run: Run, results: Path, timeout_s: float, log) -> dict:
    """One bench process under ``timeout_s`` (SIGTERM, then SIGKILL); returns its summary."""
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    libs = cuda_library_dirs()
    if libs:
        env["LD_LIBRARY_PATH"] = ":".join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    before = set(results.glob("unet-*.json"))
    argv = [sys.executable, "-m", "litefocus.bench.cli", *bench_argv(run, results)]
    log.write(f"\n$ {' '.join(argv)}   # timeout {timeout_s:.0f} s\n")
    log.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    status = "done"
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        status = "timeout"
        proc.send_signal(signal.SIGTERM)  # the bench records the rest as skipped and writes its record
        try:
            rc = proc.wait(timeout=KILL_AFTER_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            status = "killed"
    new = sorted(set(results.glob("unet-*.json")) - before)
    return {"run": run.name, "status": status, "rc": rc, "seconds": time.perf_counter() - t0, "json": new}


def run_phase(phase: Phase, out: Path, scratch: Path) -> int:
    """Every run of ``phase`` within its budget; $OUT gets the JSONs, a table, a plot and the log."""
    from litefocus.bench.report import load_record, write_report

    out.mkdir(parents=True, exist_ok=True)
    results = scratch / phase.name
    results.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summaries = []
    with open(out / f"{phase.name}.log", "a") as log:
        log.write(f"phase {phase.name}: {phase.what}; budget {phase.budget_s:g} s\n")
        for run in phase.runs:
            left = phase.budget_s - (time.perf_counter() - start)
            if left < MIN_RUN_S:
                summaries.append({"run": run.name, "status": "not started (budget)", "rc": None, "json": []})
                continue
            summaries.append(run_one(run, results, min(run.cap_s, left), log))
            logger.info("phase %s run %s: %s", phase.name, run.name, summaries[-1]["status"])
    records = []
    for s in summaries:
        for i, path in enumerate(s["json"]):
            name = f"{phase.name}-{s['run']}{'' if i == 0 else f'-{i}'}.json"
            shutil.copyfile(path, out / name)
            try:
                records.append(load_record(path))
            except ValueError as e:
                logger.warning("%s", e)
    summary = summary_table(records, summaries)
    if records:
        md, _ = write_report(records, out / phase.name)
        md.write_text(summary + "\n" + md.read_text())
    else:
        (out / f"{phase.name}.md").write_text(summary)
    print(summary)
    return 0 if records else 1


def host_ms_per_step(row: dict) -> str:
    """What a generation's step costs beyond the timed UNet call: the sampler's numpy step, the
    per-step copies and launches (denoising time per step minus the median UNet step)."""
    steps, denoise = row.get("steps") or 0, row.get("denoise_s")
    if not steps or denoise is None:
        return "–"
    return f"{1e3 * denoise / steps - row['step_ms_p50']:.2f}"


def summary_table(records: list[dict], summaries: list[dict]) -> str:
    """Every row of every run: median step, its ratio to diffusers eager and to diffusers-compile of the
    same run, the fraction of the dense-matmul ceiling, and what did not run."""
    from litefocus.bench.report import backend_label

    lines = [
        "| run | seconds | backend | step p50 ms | vs diffusers | vs diffusers-compile | % of matmul ceiling "
        "| generate s | host ms/step | peak MB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for rec in records:
        base = {r["seconds"]: r["step_ms_p50"] for r in rec["rows"] if r["backend"] == "diffusers"}
        comp = {r["seconds"]: r["step_ms_p50"] for r in rec["rows"] if r["backend"] == "diffusers-compile"}
        for r in sorted(rec["rows"], key=lambda r: (r["seconds"], backend_label(r))):
            ms = r["step_ms_p50"]
            b, c = base.get(r["seconds"]), comp.get(r["seconds"])
            cells = [
                rec["created"],
                f"{r['seconds']:g}",
                backend_label(r),
                f"{ms:.1f}",
                f"{b / ms:.2f}x" if b else "–",
                f"{c / ms:.2f}x" if c else "–",
                f"{100 * r['ceiling_fraction']:.1f}",
                "–" if r["generate_s"] is None else f"{r['generate_s']:.1f}",
                host_ms_per_step(r),
                "–" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        notes += [
            f"- {s['backend']} {s['seconds']:g} s: {s['status']} ({s['reason']})" for s in rec["skipped"]
        ]
    for s in summaries:
        if s["status"] != "done" or s["rc"]:
            notes.append(f"- run {s['run']}: {s['status']}, exit status {s['rc']}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m litefocus.bench.gpu_plan", description=__doc__.split("\n\n")[0]
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one phase on the GPU machine")
    r.add_argument("--phase", choices=sorted(PHASES), required=True)
    r.add_argument("--out", type=Path, required=True, help="what comes back ($OUT)")
    r.add_argument("--scratch", type=Path, help="where the bench writes (default: a temporary directory)")
    c = sub.add_parser("check", help="the dry run: arguments, output names and paths")
    c.add_argument("--out", type=Path, required=True)
    sub.add_parser("show", help="print the plan as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "show":
        print(json.dumps({k: {"budget_s": v.budget_s, "what": v.what, "runs": [vars(x) for x in v.runs]}
                          for k, v in PHASES.items()}, indent=1, default=list))  # fmt: skip
        return 0
    if args.cmd == "check":
        args.out.mkdir(parents=True, exist_ok=True)
        problems = check(args.out)
        for line in problems:
            print(f"gpu plan: {line}", file=sys.stderr)
        if not problems:
            total = sum(len(ph.runs) for ph in PHASES.values())
            print(f"gpu plan: {total} runs in {len(PHASES)} phases check out; outputs -> {args.out}")
        return 1 if problems else 0
    with tempfile.TemporaryDirectory(prefix="litefocus-gpu-") as tmp:
        return run_phase(PHASES[args.phase], args.out, args.scratch or Path(tmp))


if __name__ == "__main__":
    raise SystemExit(main())
