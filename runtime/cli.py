"""``litefocus-generate``: text -> WAV from an engine directory.

litefocus-generate "rain on a tin roof" --seconds 80 --engines engines -o rain.wav --seed 1
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from litefocus.engine.backends import RUNTIME_BACKENDS
from litefocus.engine.fileio import writable_target
from litefocus.runtime.inputs import check_prompt
from litefocus.runtime.options import SCHEDULERS

PROG = "litefocus-generate"
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + the signal number, as a shell reports a killed command


class Terminated(BaseException):
    """SIGTERM (or SIGHUP: the terminal closed), raised in the main thread so that ``finally`` blocks
    and atomic_path's cleanup run; ``args[0]`` is the signal number."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


TERMINATING = (signal.SIGTERM, signal.SIGHUP)  # by default they kill without cleanup: a temp WAV stays


@contextlib.contextmanager
def _sigterm_raises():
    """While the block runs, SIGTERM and SIGHUP raise Terminated (only the main thread can set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in TERMINATING}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


def check_output_path(path: Path, engines: Path | None = None) -> None:
    """Fail before the (long) generation when the WAV cannot be written there: a new path in an
    existing, writable directory, or a writable regular file (never a FIFO, device or directory),
    outside the engine directory ``engines`` (a WAV there would replace an engine file or the
    manifest, or make the directory foreign to litefocus-export --force)."""
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
    if engines is not None and engines.is_dir():
        home, where = os.path.realpath(engines), os.path.realpath(target.parent)
        if os.path.commonpath([home, where]) == home:
            raise ValueError(f"-o {path} is inside the engine directory {engines}; write the WAV outside it")
    try:
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as e:
        raise ValueError(f"-o {path}: cannot write in {target.parent} ({e.strerror})") from None


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 2 on bad input, 1 on a failed run, 130 on Ctrl-C, 143 on SIGTERM, 129 on SIGHUP:
    one line on stderr, never a traceback; the WAV is written whole or not at all."""
    try:
        with _sigterm_raises():
            return _main(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        return EXIT_SIGINT
    except Terminated as e:
        signum = e.args[0] if e.args else signal.SIGTERM
        print(f"{PROG}: terminated ({signal.Signals(signum).name}); nothing was written", file=sys.stderr)
        return 128 + signum


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
        check_output_path(args.output, args.engines)
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
    try:
        print(
            f"wrote {_shown(args.output)}: {len(audio.waveform)} samples at {audio.sample_rate} Hz from bucket "
            f"{audio.bucket}, seed {audio.seed} ({times})",
            flush=True,
        )
    except BrokenPipeError:  # stdout closed early (| head): the WAV is written all the same
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return 0


def _shown(path: Path) -> str:
    """A path as printable text: undecodable bytes of the file name (surrogates) as escapes."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
