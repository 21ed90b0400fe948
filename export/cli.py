"""``litefocus-export``: static per-bucket ONNX (and TensorRT) engines of an AudioLDM2 model.

    litefocus-export --seconds 10 20 40 80 --random-weights --out engines

Usage errors exit 2 with one line naming the bad value; a failed export (audit or validation)
exits 1; nothing half-written is left behind either way.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import torch

from litefocus.buckets import MAX_SECONDS, check_seconds
from litefocus.config import LiteFocusConfig
from litefocus.export.plan import BUILD_BACKENDS, ExportOptions
from litefocus.models import PRESETS

MAX_BATCH = 64  # UNet rows per call (32 guided requests): far past what one step holds at audio lengths

logger = logging.getLogger("litefocus.export")


class UsageError(Exception):
    pass


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so that the export's cleanup (scratch folders) runs;
    ``args[0]`` is the signal number."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


TERMINATING = (signal.SIGTERM, signal.SIGHUP)


def _backend_name(raw: str) -> str:
    """--backend as typed; "onnx", the name earlier versions used for ONNX Runtime, still works."""
    return "onnxruntime" if raw == "onnx" else raw


def build_parser() -> argparse.ArgumentParser:
    from litefocus.export.gpu_form import add_gpu_ops_argument

    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        prog="litefocus-export",
        description="Export an AudioLDM2 UNet with LiteFocus (and its VAE decoder + vocoder) as static, "
        "validated ONNX / TensorRT engines, one per duration bucket.",
    )
    p.add_argument(
        "--seconds",
        nargs="+",
        required=True,
        metavar="S",
        help=f"audio length(s) of the buckets, each in (0, {MAX_SECONDS:g}]",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        default=None,
        metavar="ID_OR_DIR",
        help="hub id or local AudioLDM2 diffusers directory (default: cvssp/audioldm2)",
    )
    src.add_argument(
        "--random-weights",
        action="store_true",
        help="the real architecture of --preset with seeded random weights (for latency work)",
    )
    p.add_argument(
        "--preset", default="audioldm2", help=f"with --random-weights: one of {', '.join(PRESETS)}"
    )
    p.add_argument("--weights-seed", type=int, default=0, help="with --random-weights: the weight seed")
    p.add_argument("--out", type=Path, default=Path("engines"), help="engine directory (default: ./engines)")
    p.add_argument(
        "--backend",
        type=_backend_name,
        choices=BUILD_BACKENDS,
        default="auto",
        help="auto: TensorRT where it is installed and a GPU exists, else ONNX Runtime",
    )
    p.add_argument(
        "--attention",
        choices=["auto", "fused", "plain"],
        default="auto",
        help="how the graphs express attention. fused: ONNX Runtime's MultiHeadAttention (tiled: memory "
        "linear in length); plain: MatMul-Softmax-MatMul (holds every score matrix). auto: fused, or plain "
        "with --backend tensorrt (TensorRT fuses attention itself)",
    )
    p.add_argument(
        "--conv",
        choices=["auto", "winograd", "direct"],
        default="auto",
        help="how the UNet's 3x3 convolutions are expressed. winograd: F(4x4, 3x3) out of plain ops, "
        "1.3-2.7x faster per conv on ONNX Runtime's CPU EP (error ~2e-5 of the output RMS per conv); "
        "direct: one Conv node each. auto: winograd for fp32 CPU exports, else direct (GPU, TensorRT, fp16)",
    )
    add_gpu_ops_argument(
        p,
        "the GPU graph form's pieces (ONNX Runtime CUDA contrib ops; such graphs run on the CUDA EP "
        "only): nhwc (NhwcConv + GroupNorm with SiLU fused, channels-last maps end to end), "
        "skip_group_norm (needs nhwc), bias_split_gelu, packed_attention (one projection per attention, "
        "cross-attention fused). auto (default): none for now, until the form is "
        "measured on a GPU (bench/gpu/run.sh C); none: the form every EP runs",
    )
    p.add_argument(
        "--decode-window",
        type=float,
        default=None,
        metavar="SECONDS",
        help="time-chunked decode for buckets longer than this: the decode graph takes windows of SECONDS "
        "(a quarter overlapping, cross-faded) instead of the whole latent. Not exact: its error against "
        "the full decode is measured and recorded. Default: off (full decode)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16"],
        default="fp16" if gpu else "fp32",
        help=f"default: {'fp16 (a GPU is present)' if gpu else 'fp32 (no GPU)'}",
    )
    p.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[2],
        help="UNet batch size(s), one engine each (default 2: one request with classifier-free guidance). "
        "Serving batches requests per denoising step into the smallest that holds them: a guided request "
        "takes 2 rows, an unguided one 1 (e.g. --batch 2 4 8)",
    )
    p.add_argument(
        "--text-len",
        type=int,
        default=128,
        help="fixed T5 token length of the engine (the text engine needs a language model with at least "
        "text-len + 12 positions)",
    )
    p.add_argument(
        "--no-litefocus", action="store_true", help="export the plain full-attention UNet (baseline)"
    )
    p.add_argument("--sparse-ratio", type=float, default=0.1, help="LiteFocus r (default 0.1)")
    p.add_argument(
        "--index-mode",
        choices=["resample", "fixed"],
        default="resample",
        help="resample: global indices are an engine input; fixed: baked per layer",
    )
    p.add_argument("--litefocus-seed", type=int, default=0, help="seed of the LiteFocus index sample")
    p.add_argument(
        "--device",
        default="cuda" if gpu else "cpu",
        help="where PyTorch traces and validates the modules (default: cuda when there is a GPU)",
    )
    p.add_argument(
        "--no-text",
        action="store_true",
        help="skip the text-conditioning engine (text/: prompt -> conditioning without torch), which is "
        "otherwise exported once per directory when the model has text encoders",
    )
    p.add_argument("--force", action="store_true", help="rebuild even when a cached entry matches")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    return p


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    """The request of ``args`` (UsageError naming the flag of a bad value); nothing is resolved here."""
    seconds = []
    for raw in args.seconds:
        try:
            seconds.append(check_seconds(raw))
        except ValueError as e:
            raise UsageError(f"--seconds {raw}: {e}") from None
    if args.preset not in PRESETS:
        raise UsageError(f"--preset {args.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    if args.weights_seed < 0:
        raise UsageError(f"--weights-seed must be >= 0, got {args.weights_seed}")
    for value in args.batch:
        if not 1 <= value <= MAX_BATCH:
            raise UsageError(f"--batch {value}: each batch size must be in 1..{MAX_BATCH}")
    if args.decode_window is not None:
        try:
            check_seconds(str(args.decode_window))
        except ValueError as e:
            raise UsageError(f"--decode-window {args.decode_window:g}: {e}") from None
    if args.text_len < 1:
        raise UsageError(f"--text-len must be >= 1, got {args.text_len}")
    config = None
    if not args.no_litefocus:
        try:
            config = LiteFocusConfig(
                sparse_ratio=args.sparse_ratio, index_mode=args.index_mode, seed=args.litefocus_seed
            )
        except ValueError as e:
            msg = str(e)
            for field, flag in (
                ("sparse_ratio", "--sparse-ratio"),
                ("seed", "--litefocus-seed"),
                ("index_mode", "--index-mode"),
            ):
                msg = msg.replace(f"LiteFocusConfig.{field}", flag)
            raise UsageError(msg) from None
    device = _check_device(args.device)
    if args.precision == "fp16" and device == "cpu":
        logger.warning("fp16 on CPU: tracing and validation are slow there; export fp16 with --device cuda")
    model = None if args.random_weights else (args.model or "cvssp/audioldm2")
    if model is not None:
        path = Path(model).expanduser()
        if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
            _check_model_dir(path, model)
    return ExportOptions(
        seconds=tuple(seconds),
        out=args.out,
        model=model,
        random_preset=args.preset if args.random_weights else None,
        weights_seed=args.weights_seed,
        backend=args.backend,
        precision=args.precision,
        batches=tuple(sorted(set(args.batch))),
        text_len=args.text_len,
        litefocus=config,
        force=args.force,
        quiet=args.quiet,
        device=device,
        text=not args.no_text,
        attention=args.attention,
        decode_window=args.decode_window,
        conv=args.conv,
        gpu_ops=_gpu_ops(args.gpu_ops),
    )


def _gpu_ops(values: list[str]):
    from litefocus.export.gpu_form import parse_gpu_ops

    try:
        return parse_gpu_ops(values)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_device(raw: str) -> str:
    from litefocus.models import check_device

    try:
        return str(check_device(raw))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_model_dir(path: Path, raw: str) -> None:
    """Fail fast (before anything heavy) on a model path that cannot be an AudioLDM2 directory."""
    from litefocus.models import UNET, component_dir

    if not path.is_dir():
        raise UsageError(
            f"--model {raw}: no such directory; pass an AudioLDM2 diffusers directory or a hub id "
            "such as cvssp/audioldm2 (or --random-weights)"
        )
    try:
        component_dir(path, UNET)
    except ValueError as e:
        raise UsageError(f"--model {raw}: {e}") from None


def print_table(rows: list[dict], out: Path) -> None:
    header = (
        f"{'entry':<16}{'status':<8}{'seconds':>8}{'exact':>8}{'S':>7}{'unet err':>10}{'decode err':>11}"
        f"{'MB':>8}{'time s':>8}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['entry']:<16}{r['status']:<8}{r['seconds']:>8g}{r['exact_seconds']:>8g}{r['S']:>7}"
            f"{r['unet_rel_err']:>10.1e}{r['decode_rel_err']:>11.1e}{r['mb']:>8.0f}{r['build_s']:>8.1f}"
        )
    print(f"engines in {out}/ (manifest.json)")


def main(argv: list[str] | None = None) -> int:
    """Exit 0, 2 on bad input, 1 on a failed export, 130 on Ctrl-C, 143 on SIGTERM (129 on SIGHUP): one
    line on stderr, never a traceback; an interrupted export discards what it had not finished."""
    main_thread = threading.current_thread() is threading.main_thread()  # only it can set handlers
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in TERMINATING} if main_thread else {}
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("litefocus-export: interrupted (Ctrl-C); unfinished engines were discarded", file=sys.stderr)
        return 130
    except Terminated as e:
        signum = e.args[0] if e.args else signal.SIGTERM
        name = signal.Signals(signum).name
        print(f"litefocus-export: terminated ({name}); unfinished engines were discarded", file=sys.stderr)
        return 128 + signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    from litefocus.export.audit import AuditError
    from litefocus.export.build import build_engines
    from litefocus.export.plan import resolve_plan
    from litefocus.export.tensorrt_build import TensorRTNotInstalled
    from litefocus.export.validate import ValidationError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        plan = resolve_plan(options_from_args(args))
        manifest, rows = build_engines(plan)
    except (UsageError, TensorRTNotInstalled) as e:
        print(f"litefocus-export: error: {e}", file=sys.stderr)
        return 2
    except (AuditError, ValidationError) as e:
        print(f"litefocus-export: export failed: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # user errors found while loading / preparing the output directory
        print(f"litefocus-export: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as e:  # the hub is unreachable, the disk is full, ...
        print(f"litefocus-export: export failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    try:
        print_table(rows, plan.out)
        if manifest.get("text") is not None:
            print(f"text conditioning engine in {plan.out}/text/ (prompt -> UNet conditioning, no torch)")
        sys.stdout.flush()
    except BrokenPipeError:  # stdout closed early (| head): the engines are written all the same
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
