"""``litefocus-generate``: text -> WAV from an engine directory.

litefocus-generate "rain on a tin roof" --seconds 80 --engines engines -o rain.wav --seed 1
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path

from litefocus.engine.backends import RUNTIME_BACKENDS
from litefocus.engine.fileio import writable_target
from litefocus.runtime.inputs import check_prompt
from litefocus.runtime.sampling import SCHEDULERS

PROG = "litefocus-generate"
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + the signal number, as a shell reports a killed command


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``finally`` blocks and atomic_path's cleanup run."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises():
    """While the block runs, SIGTERM raises Terminated (only the main thread can set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Generate audio from a litefocus engine directory.")
    p.add_argument("prompt", help="text prompt")
    p.add_argument(
        "--seconds", type=float, required=True, help="audio length; the smallest bucket that holds it is used"
    )
    p.add_argument(
        "--engines", type=Path, default=Path("engines"), help="engine directory (default: ./engines)"
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="WAV file to write")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=None, help="same seed -> same audio (default: random)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--guidance", type=float, default=3.5, help="classifier-free guidance scale (>= 1)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="ddim")
    p.add_argument("--backend", choices=RUNTIME_BACKENDS, default="auto")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda[:N]: ONNX Runtime's CUDA EP (onnxruntime-gpu) or TensorRT",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="with --device cuda: capture each UNet session once as a CUDA graph and replay it every step",
    )
    p.add_argument("--float", action="store_true", help="32-bit float WAV instead of 16-bit PCM")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def check_output_path(path: Path) -> None:
    """Fail before the (long) generation when the WAV cannot be written there: a new path in an
    existing, writable directory, or a writable regular file (never a FIFO, device or directory)."""
    import tempfile

    if path.is_dir():
        raise ValueError(f"-o {path} is a directory; pass a file name such as {path / 'out.wav'}")
    try:
        target, _ = writable_target(path)
    except ValueError as e:
        raise ValueError(f"-o {e}") from None
    if not target.parent.is_dir():
        raise ValueError(
            f"-o {path}: directory {target.parent} does not exist; create it or choose another path"
        )
    try:
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as e:
        raise ValueError(f"-o {path}: cannot write in {target.parent} ({e.strerror})") from None


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 2 on bad input, 1 on a failed run, 130 on Ctrl-C, 143 on SIGTERM: always
    one line on stderr, never a traceback; the WAV is written whole or not at all."""
    try:
        with _sigterm_raises():
            return _main(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        return EXIT_SIGINT
    except Terminated:
        print(f"{PROG}: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return EXIT_SIGTERM


def _main(argv: list[str] | None) -> int:
    from litefocus.engine.tensorrt_backend import TensorRTNotInstalled
    from litefocus.runtime import GenerateOptions, Runtime, write_wav

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        check_prompt(args.prompt)
        if args.negative_prompt is not None:
            check_prompt(args.negative_prompt, "--negative-prompt")
        check_output_path(args.output)
        if args.seed is not None and not 0 <= args.seed < 2**63:
            raise ValueError(f"--seed {args.seed} is out of range; use an integer in [0, 2**63)")
        options = GenerateOptions(
            steps=args.steps,
            guidance_scale=args.guidance,
            scheduler=args.scheduler,
            seed=args.seed,
            negative_prompt=args.negative_prompt,
        )
        with Runtime.load(
            args.engines, backend=args.backend, device=args.device, cuda_graph=args.cuda_graph
        ) as rt:
            audio = rt.generate(args.prompt, args.seconds, options, progress=not args.quiet)
        write_wav(args.output, audio, float32=args.float)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except TensorRTNotInstalled as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as e:
        print(f"{PROG}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    times = ", ".join(f"{k} {v:.2f} s" for k, v in audio.timings.items())
    print(
        f"wrote {_shown(args.output)}: {len(audio.waveform)} samples at {audio.sample_rate} Hz from bucket "
        f"{audio.bucket}, seed {audio.seed} ({times})"
    )
    return 0


def _shown(path: Path) -> str:
    """A path as printable text: undecodable bytes of the file name (surrogates) as escapes."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
