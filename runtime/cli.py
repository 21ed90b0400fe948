"""``litefocus-generate``: text -> WAV from an engine directory.

litefocus-generate "rain on a tin roof" --seconds 80 --engines engines -o rain.wav --seed 1
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from litefocus.engine.backends import RUNTIME_BACKENDS
from litefocus.runtime.sampling import SCHEDULERS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="litefocus-generate", description="Generate audio from a litefocus engine directory."
    )
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
    """Fail before the (long) generation when the WAV cannot be written there."""
    import tempfile

    if path.is_dir():
        raise ValueError(f"-o {path} is a directory; pass a file name such as {path / 'out.wav'}")
    if not path.parent.is_dir():
        raise ValueError(
            f"-o {path}: directory {path.parent} does not exist; create it or choose another path"
        )
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise ValueError(f"-o {path}: cannot write in {path.parent} ({e.strerror})") from None


def main(argv: list[str] | None = None) -> int:
    from litefocus.engine.tensorrt_backend import TensorRTNotInstalled
    from litefocus.runtime import GenerateOptions, Runtime, write_wav

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
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
        print(f"litefocus-generate: error: {e}", file=sys.stderr)
        return 2
    except TensorRTNotInstalled as e:
        print(f"litefocus-generate: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as e:
        print(f"litefocus-generate: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    times = ", ".join(f"{k} {v:.2f} s" for k, v in audio.timings.items())
    print(
        f"wrote {args.output}: {len(audio.waveform)} samples at {audio.sample_rate} Hz from bucket "
        f"{audio.bucket}, seed {audio.seed} ({times})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
