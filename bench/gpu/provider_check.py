"""Every fp32 graph of an engine directory on ONNX Runtime's CUDA EP against its CPU EP, under
several CUDA EP settings, to tell which graphs (and which setting) move fp32 results on a GPU.

The CPU EP is the reference: export validation holds it within 1e-4 of PyTorch. Variants:
``tf32=0`` (what the runtime and validation use for fp32 graphs), the same with ONNX Runtime's
graph optimizations off or basic only (fusions such as FastGelu or SkipLayerNormalization come
from the extended level), ``tf32=1`` (the CUDA EP's default), and ``runtime``: the session the
runtime itself opens (``open_session``). Called by batching_check.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

VARIANTS = {  # name: (use_tf32, graph optimization level; None: the runtime's own session options)
    "runtime": (0, None),
    "cuda tf32=0": (0, "ORT_ENABLE_ALL"),
    "cuda tf32=0 opt=basic": (0, "ORT_ENABLE_BASIC"),
    "cuda tf32=0 opt=off": (0, "ORT_DISABLE_ALL"),
    "cuda tf32=1": (1, "ORT_ENABLE_ALL"),
}


def _feeds(session, tokens: dict, seed: int) -> dict:
    """Random inputs by name and type: latents, timesteps, states; LiteFocus indices below the
    level's token count; CLAP/T5 ids and right-padded masks (the conditioning graph)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        shape, name = i.shape, i.name
        if i.type == "tensor(float)":
            scale = 500.0 if name == "timestep" else 1.0
            feeds[name] = np.abs(rng.standard_normal(shape)).astype(np.float32) * scale
        elif m := re.fullmatch(r"litefocus_indices_f(\d+)", name):
            feeds[name] = rng.integers(0, tokens[m.group(1)], shape).astype(np.int32)
        elif "mask" in name:
            lengths = rng.integers(2, shape[-1] + 1, shape[:-1])
            feeds[name] = (np.arange(shape[-1]) < lengths[..., None]).astype(np.dtype(i.type[7:-1]))
        else:  # token ids
            feeds[name] = rng.integers(0, 32, shape).astype(np.dtype(i.type[7:-1]))
    return feeds


def _run(path: Path, providers: list, level: str | None, feeds: dict | None, tokens: dict, seed: int):
    """``level`` None: the session the runtime opens (``open_session``: its options for the module)."""
    import onnxruntime as ort

    from litefocus.engine.backends import open_session

    if level is None:
        module = "conditioning" if path.name == "conditioning.onnx" else path.stem
        session = open_session(path, providers, module)
    else:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        session = ort.InferenceSession(str(path), options, providers=providers)
    feeds = feeds if feeds is not None else _feeds(session, tokens, seed)
    names = [o.name for o in session.get_outputs()]
    return feeds, dict(zip(names, session.run(names, feeds), strict=True)), session.get_providers()[0]


def compare_providers(engines: Path, seed: int = 1) -> list[dict]:
    """One row per (graph, variant): max |CUDA - CPU| / RMS(CPU) and max abs, per output."""
    manifest = json.loads((engines / "manifest.json").read_text())
    graphs = []
    if manifest.get("text"):
        graphs.append(("text", manifest["text"]["files"]["onnx"]["path"], {}))
    for name, entry in sorted(manifest["entries"].items()):
        if entry["precision"] != "fp32":
            continue
        for module, record in entry["modules"].items():
            graphs.append((f"{name}/{module}", record["files"]["onnx"]["path"], entry["bucket"]["tokens"]))
    rows = []
    for label, rel, tokens in graphs:
        path = engines / rel
        feeds, want, _ = _run(path, ["CPUExecutionProvider"], "ORT_ENABLE_ALL", None, tokens, seed)
        for variant, (tf32, level) in VARIANTS.items():
            providers = [("CUDAExecutionProvider", {"use_tf32": tf32}), "CPUExecutionProvider"]
            _, got, provider = _run(path, providers, level, feeds, tokens, seed)
            errors = {}
            for out, w in want.items():
                d = np.abs(got[out].astype(np.float64) - w)
                rms = float(np.sqrt(np.mean(np.square(w, dtype=np.float64)))) or 1.0
                errors[out] = {"max_rel_rms": float(d.max() / rms), "max_abs": float(d.max())}
            rows.append({"graph": label, "variant": variant, "provider": provider, "outputs": errors})
    return rows
