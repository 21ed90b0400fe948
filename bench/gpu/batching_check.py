"""GPU check of step-level batching: requests batched into one UNet call per step on ONNX Runtime's
CUDA EP get the audio they get alone, and how long both take. Run by ``bench/gpu/run.sh check``.

The tiny random AudioLDM2 pipeline of the tests (with its text engine) is exported on the GPU with
batch sizes 2, 4 and 8; four guided requests (different seeds, step counts and schedulers) run
(a) together through one ``BatchedUNet`` and (b) one by one through ``Runtime.generate``.
Writes ``batching-check.json`` into ``--out``; exits 1 when a request differs by more than 1e-4.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TOLERANCE = 1e-4
SECONDS = 0.64
REQUESTS = [  # prompt, seconds, steps, scheduler, seed
    ("a dog barks", 0.64, 8, "ddim", 1),
    ("rain on a roof", 0.5, 6, "dpm++", 2),
    ("wind in the trees", 0.6, 8, "ddim", 3),
    ("a bell rings", 0.3, 4, "dpm++", 4),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a rehearsal)")
    args = p.parse_args(argv)
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parents[1] / "tests")]  # provider_check, the tiny model builders
    from litefocus.export import cli as export_cli
    from litefocus.runtime import GenerateOptions, Runtime
    from litefocus.runtime.batching import BatchedUNet, decode_waveform, new_slot
    from tiny_models import T5_MAX_LENGTH, save_tiny_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="litefocus-batching-"))
    save_tiny_pipeline(tmp / "pipe")
    export = ["--seconds", str(SECONDS), "--model", str(tmp / "pipe"), "--out", str(tmp / "engines")]
    export += ["--text-len", str(T5_MAX_LENGTH), "--batch", "2", "4", "8", "--precision", "fp32"]
    if export_cli.main([*export, "--device", "cpu", "-q"]) != 0:  # validated on CPU (no TF32)
        return 1
    providers = []  # fp32 graphs on the CUDA EP vs the CPU EP (provider_check.py, beside this file)
    if args.device == "cuda":
        from provider_check import compare_providers

        try:
            providers = compare_providers(tmp / "engines")
        except Exception as e:  # a diagnosis: the batching check below still runs
            providers = [{"error": f"{type(e).__name__}: {e}"}]
        for row in providers:
            print(json.dumps(row))
    rt = Runtime.load(tmp / "engines", backend="onnxruntime", device=args.device)
    options = [GenerateOptions(steps=k, scheduler=s, seed=seed) for _, _, k, s, seed in REQUESTS]
    conds = [rt.text_encoder()(prompt, None, guided=True) for prompt, *_ in REQUESTS]
    group = rt.batch_group(rt.bucket_for(SECONDS), modules=("unet", "decode"))
    provider = group[2].unet.session.get_providers()[0]

    def batched() -> tuple[list[np.ndarray], float, dict]:
        unet = BatchedUNet(group)
        slots = [new_slot(c, o, unet.contract, rt.schedule) for c, o in zip(conds, options, strict=True)]
        t0 = time.perf_counter()
        while not all(s.done for s in slots):
            unet.step(slots)
        seconds = time.perf_counter() - t0
        waves = [
            decode_waveform(group[2].decode, s.latents, r[1]) for s, r in zip(slots, REQUESTS, strict=True)
        ]
        return waves, seconds, unet.stats

    def alone() -> tuple[list[np.ndarray], float]:
        waves, seconds = [], 0.0
        for (prompt, sec, *_), o in zip(REQUESTS, options, strict=True):
            audio = rt.generate(prompt, sec, o, progress=False)
            waves.append(audio.waveform)
            seconds += audio.timings["denoise"]
        return waves, seconds

    batched(), alone()  # warm-up: first calls pay for cuDNN / arena set-up
    got, t_batched, stats = batched()
    want, t_alone = alone()
    errors = [float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True)]
    peaks = [float(np.abs(b).max()) for b in want]
    result = {
        "check": "step-level batching vs alone",
        "device": args.device,
        "provider": provider,
        "requests": [
            {"prompt": r[0], "seconds": r[1], "steps": r[2], "scheduler": r[3], "seed": r[4]}
            for r in REQUESTS
        ],
        "max_abs_error": errors,
        "peak_abs": peaks,
        "tolerance": TOLERANCE,
        "denoise_s_batched": t_batched,
        "denoise_s_alone_sum": t_alone,
        "unet_calls_batched": stats["calls"],
        "unet_calls_alone": sum(r[2] for r in REQUESTS),
        "rows_used": stats["rows_used"],
        "rows_run": stats["rows_run"],
        "ok": max(errors) <= TOLERANCE and min(peaks) > 1e-3,
        "providers": providers,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batching-check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("requests", "providers")}))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
