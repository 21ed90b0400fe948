"""Which GPU kernels one UNet step and one decode of an exported engine run, and for how long.

ONNX Runtime's own profiler times nodes on the host; on the CUDA EP that is launch time. PyTorch's
profiler (CUPTI) sees every CUDA kernel of the process, ONNX Runtime's too, so this script opens the
engine through the runtime (IO binding, as a generation runs it), warms it up, and profiles
``--steps`` UNet calls and one decode. Per graph: the top ``--top`` kernels by GPU time, with calls
and their share. Run by ``bench/gpu/run.sh C`` after the phase (its engines are in /tmp); with
``ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO=1`` ONNX Runtime also prints which attention kernel each
MultiHeadAttention node picked (the VAE's 512-wide head). ``--device cpu`` is the rehearsal: the
same calls, CPU time only.

    python bench/gpu/profile_engine.py --engines /tmp/litefocus-engines --seconds 80 --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _self_ms(event, cuda: bool) -> float:
    names = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
    for name in names:
        if hasattr(event, name):
            return getattr(event, name) / 1e3
    return 0.0


def profile(call, repeats: int, cuda: bool, top: int) -> dict:
    """``repeats`` calls of ``call`` under PyTorch's profiler: the top kernels by time."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(repeats):
            call()
        sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / repeats
    events = [e for e in prof.key_averages() if _self_ms(e, cuda) > 0]
    total = sum(_self_ms(e, cuda) for e in events)
    events.sort(key=lambda e: _self_ms(e, cuda), reverse=True)
    rows = [
        {
            "kernel": e.key[:200],
            "calls_per_run": e.count / repeats,
            "ms_per_run": _self_ms(e, cuda) / repeats,
            "share": _self_ms(e, cuda) / total if total else 0.0,
        }
        for e in events[:top]
    ]
    return {"runs": repeats, "wall_ms_per_run": wall_ms, "kernel_ms_per_run": total / repeats, "top": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=80.0)
    p.add_argument("--device", default="cuda", help="cuda (the profile) or cpu (a rehearsal)")
    p.add_argument("--cuda-graph", action="store_true", help="the UNet session captured as a CUDA graph")
    p.add_argument("--steps", type=int, default=5, help="profiled UNet calls (after 3 warm-up calls)")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from litefocus.runtime import Runtime
    from litefocus.runtime.options import Conditioning
    from litefocus.runtime.sampling import UNetCall

    cuda = args.device.startswith("cuda")
    with Runtime.load(args.engines, device=args.device, cuda_graph=args.cuda_graph) as rt:
        name = rt.bucket_for(args.seconds)
        unet, decode, uc, dc = rt.open_entry(name)
        feeds = {k: v.numpy() for k, v in uc.sample_inputs(0).items()}
        cond = Conditioning(feeds["encoder_hidden_states"], feeds["encoder_hidden_states_1"],
                            feeds["encoder_attention_mask_1"])  # fmt: skip
        call = UNetCall(unet, cond)
        indices = {k: v for k, v in feeds.items() if k.startswith("litefocus_indices")}
        t = int(feeds["timestep"][0])

        def step():
            call(feeds["sample"], t, indices)

        latent = {"latent": dc.sample_inputs(0)["latent"].numpy()}

        def decode_once():
            out = decode(latent)
            if not np.isfinite(out).all():
                raise RuntimeError("the decode returned non-finite samples")

        for _ in range(3):
            step()
        decode_once()
        record = {
            "engines": str(args.engines),
            "entry": name,
            "device": args.device,
            "cuda_graph": args.cuda_graph,
            "gpu_ops": {m: list(rt.entries[name].modules[m].gpu_ops) for m in ("unet", "decode")},
            "unet": profile(step, args.steps, cuda, args.top),
            "decode": profile(decode_once, 1, cuda, args.top),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile-{'cuda' if cuda else 'cpu'}-{int(args.seconds)}s.json"
    path.write_text(json.dumps(record, indent=1))
    for graph in ("unet", "decode"):
        r = record[graph]
        print(
            f"{graph}: {r['kernel_ms_per_run']:.2f} ms of kernels, {r['wall_ms_per_run']:.2f} ms wall per run"
        )
        for row in r["top"][:8]:
            print(f"  {row['ms_per_run']:8.3f} ms {100 * row['share']:5.1f} %  {row['kernel'][:100]}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
