"""``litefocus-bench``: UNet step and decode time and memory, generation time and FLOPs per bucket/backend.

    litefocus-bench --seconds 10 20 40 80 160                 # every backend that runs here
    litefocus-bench --seconds 80 --backends diffusers litefocus --steps 2
    litefocus-bench --quick                                   # tiny model, seconds: a smoke run
    litefocus-bench report bench/results/unet-*.json          # re-render / compare runs

Each run writes ``unet-<device>-<time>.json`` (the rows) and the ``.md`` table and ``.png`` plot
rendered from it into ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import signal
import sys
import tempfile
from pathlib import Path

import torch

from litefocus.bench.targets import BACKENDS, ENGINE_BACKENDS
from litefocus.engine.contract import GPU_OPS
from litefocus.export.gpu_form import add_gpu_ops_argument, parse_gpu_ops
from litefocus.runtime.options import SCHEDULERS

logger = logging.getLogger("litefocus.bench")

DEFAULTS = {  # full runs
    "seconds": [10, 20, 40, 80, 160],
    "preset": "audioldm2",
    "steps": 25,
    "warmup": 2,
    "repeats": 5,
    "text_len": 128,
}
QUICK = {  # --quick: the tiny preset, one short bucket, a handful of calls
    "seconds": [5],
    "preset": "tiny",
    "steps": 2,
    "warmup": 1,
    "repeats": 3,
    "text_len": 16,
}


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class UsageError(ValueError):
    pass


def build_run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="litefocus-bench",
        description=__doc__.split("\n\n")[0],
        epilog="litefocus-bench report FILE... re-renders and compares runs (see litefocus-bench report -h).",
    )
    p.add_argument("--seconds", type=float, nargs="+", help=f"audio lengths (default {DEFAULTS['seconds']})")
    p.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        default=list(BACKENDS),
        metavar="BACKEND",
        help=f"any of {', '.join(BACKENDS)} (default: all; those that cannot run here are "
        "recorded as unavailable)",
    )
    p.add_argument("--preset", help="random-weights architecture (default audioldm2; tiny with --quick)")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--model", help="a hub id or local diffusers directory instead of random weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "fp16"], help="default fp16 on a GPU, fp32 on CPU")
    p.add_argument("--steps", type=int, help="steps of the full generation (default 25; 0 skips it)")
    p.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default="ddim",
        help="scheduler of the full generation (default ddim)",
    )
    p.add_argument(
        "--generate-at",
        type=float,
        nargs="+",
        metavar="S",
        help="run the full generation only at these of --seconds (default: at all of them)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="start no row after this many seconds; the rest are recorded as skipped (budget). "
        "SIGTERM (e.g. from timeout) also stops the run and still writes what it measured",
    )
    p.add_argument("--warmup", type=int, help="untimed UNet steps before timing (default 2)")
    p.add_argument("--repeats", type=int, help="timed UNet steps (default 5)")
    p.add_argument(
        "--decode-warmup",
        type=int,
        default=1,
        metavar="N",
        help="untimed decode calls (VAE decoder + vocoder) before the timed ones (default 1)",
    )
    p.add_argument(
        "--decode-repeats",
        type=int,
        default=1,
        metavar="N",
        help="timed decode calls on a random latent, with the decode's peak memory (default 1; 0 skips it)",
    )
    p.add_argument("--text-len", type=int, help="T5 sequence length of the engines (default 128)")
    p.add_argument("--sparse-ratio", type=float, default=0.1, help="LiteFocus r (default 0.1)")
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile mode of the *-compile backends (default: default)",
    )
    add_gpu_ops_argument(
        p,
        f"the engines' GPU graph form, as litefocus-export --gpu-ops (auto, none, or pieces of "
        f"{' '.join(GPU_OPS)}): one run per form measures each piece's effect",
    )
    p.add_argument(
        "--engines",
        type=Path,
        help="engine directory for onnxruntime/tensorrt: exported there when missing, reused by "
        "cache key (default ./engines; a temporary one with --quick)",
    )
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="results directory")
    p.add_argument(
        "--no-isolate",
        action="store_true",
        help="on CPU, measure every row in this process (default: each row in a fresh process, so "
        "its peak RSS is its own, not what earlier rows or the engine export left resident)",
    )
    p.add_argument("--quick", action="store_true", help="tiny model, 5 s, 2 steps: a smoke run")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    return p


def build_report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="litefocus-bench report",
        description="Re-render the Markdown table and PNG plot of runs; with several files, compare them.",
    )
    p.add_argument("files", nargs="+", type=Path, help="JSON records written by litefocus-bench")
    p.add_argument(
        "--out",
        type=Path,
        help="output path stem (default: beside the first file; compare-<first>--<last> for several)",
    )
    return p


def check_writable(out: Path) -> None:
    """Fail before a long run, not after it, when the results cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"--out {out} is not a writable directory ({e})") from None


def check_engines_dir(engines: Path) -> None:
    """--engines must be a new path, an empty folder or a litefocus engine directory."""
    from litefocus.engine.manifest import MANIFEST

    if engines.exists() and not engines.is_dir():
        raise UsageError(f"--engines {engines} is a file; pass a new or engine directory")
    if engines.is_dir() and any(engines.iterdir()) and not (engines / MANIFEST).is_file():
        raise UsageError(
            f"--engines {engines} is not empty and has no {MANIFEST}; pass a new or engine directory"
        )


def options_from_args(args, command: str, engines: Path):
    from litefocus.bench.options import BenchOptions
    from litefocus.config import LiteFocusConfig
    from litefocus.models import PRESETS, check_device, random_source

    base = QUICK if args.quick else DEFAULTS

    def pick(name):
        value = getattr(args, name)
        return base[name] if value is None else value

    preset = pick("preset")
    if preset not in PRESETS:
        raise UsageError(f"--preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    if args.model and args.preset:
        raise UsageError("give --model (real weights) or --preset (random weights), not both")
    if args.weights_seed < 0:
        raise UsageError(f"--weights-seed must be >= 0, got {args.weights_seed}")
    for flag in ("decode_warmup", "decode_repeats"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    device = args.device
    try:
        dev = check_device(device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        lf = LiteFocusConfig(sparse_ratio=args.sparse_ratio)
        opts = BenchOptions(
            seconds=tuple(pick("seconds")),
            backends=tuple(dict.fromkeys(args.backends)),
            source=args.model or random_source(preset, args.weights_seed),
            device=device,
            precision=args.precision or ("fp16" if dev.type == "cuda" else "fp32"),
            steps=pick("steps"),
            scheduler=args.scheduler,
            generate_at=None if args.generate_at is None else tuple(args.generate_at),
            time_budget_s=args.time_budget,
            isolate=dev.type == "cpu" and not args.no_isolate,
            warmup=pick("warmup"),
            repeats=pick("repeats"),
            decode_warmup=args.decode_warmup,
            decode_repeats=args.decode_repeats,
            text_len=pick("text_len"),
            engines=engines,
            out=args.out,
            compile_mode=args.compile_mode,
            gpu_ops=parse_gpu_ops(args.gpu_ops),
            litefocus=lf,
            quiet=args.quiet,
            command=command,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    if any(b in ENGINE_BACKENDS for b in opts.backends):
        check_engines_dir(engines)
    check_writable(opts.out)  # last: a usage error creates nothing
    return opts


def _stop(signum, frame):
    from litefocus.bench.run import Stopped

    raise Stopped(signal.Signals(signum).name)


def run_main(argv: list[str]) -> int:
    from litefocus.bench.record import write_record
    from litefocus.bench.report import write_report
    from litefocus.bench.run import Stopped, run_benchmark

    p = build_run_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    command = shlex.join(["litefocus-bench", *argv])
    with contextlib.ExitStack() as stack:
        engines = args.engines
        if engines is None and args.quick:  # a smoke run leaves no engines behind
            engines = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="litefocus-bench-")))
        engines = engines or Path("engines")
        try:
            opts = options_from_args(args, command, engines)
        except UsageError as e:
            p.error(str(e))
        signal.signal(signal.SIGTERM, _stop)  # a time limit ends the run cleanly, with its record
        try:
            record = run_benchmark(opts, checkpoint=opts.out)
        except (ValueError, OSError) as e:  # e.g. a --model that is not an AudioLDM2 pipeline
            p.error(f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e))
        except Stopped as e:
            logger.error("litefocus-bench: stopped (%s) before any row was measured", e or "SIGTERM")
            return 1
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    path = write_record(record, opts.out)
    md, png = write_report([record], path.with_suffix(""))
    logger.info("wrote %s, %s, %s", path, md, png)
    if not record["rows"]:
        logger.error("no row could be measured: %s", "; ".join(s["reason"] for s in record["skipped"]))
        return 1
    failed = [s for s in record["skipped"] if s["status"] == "failed"]
    if failed:
        logger.error("%d row(s) failed; see 'Not measured' in %s", len(failed), md)
        return 1
    return 0


def report_main(argv: list[str]) -> int:
    from litefocus.bench.report import load_record, write_report

    p = build_report_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        records = [load_record(f) for f in args.files]
    except ValueError as e:
        p.error(str(e))
    first = args.files[0]
    if args.out is not None:
        stem = args.out
        if not stem.parent.is_dir():
            p.error(f"--out {stem}: directory {stem.parent} does not exist")
    elif len(records) == 1:
        stem = first.with_suffix("")
    else:
        stem = first.parent / f"compare-{first.stem}--{args.files[-1].stem}"
    md, png = write_report(records, stem)
    print(md)
    print(png)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    return run_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
