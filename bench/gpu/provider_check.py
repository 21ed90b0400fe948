"""Every fp32 graph of an engine directory on ONNX Runtime's CUDA EP against its CPU EP, under
several CUDA EP settings, to tell which graphs (and which setting) move fp32 results on a GPU.

The CPU EP is the reference: export validation holds it within 1e-4 of PyTorch. Variants:
``tf32=0`` (what the runtime and validation use for fp32 graphs), the same with ONNX Runtime's
graph optimizations off or basic only (fusions such as FastGelu or SkipLayerNormalization come
from the extended level), ``tf32=1`` (the CUDA EP's default), and ``runtime``: the session the
runtime itself opens (``session_options``); every variant keeps its other options. Called by
batching_check.py.
"""

from __future__ import annotations

from pathlib import Path

VARIANTS = {  # name: (use_tf32, graph optimization level; None: the runtime's own for the module)
    "runtime": (0, None),
    "cuda tf32=0": (0, "ORT_ENABLE_ALL"),
    "cuda tf32=0 opt=basic": (0, "ORT_ENABLE_BASIC"),
    "cuda tf32=0 opt=off": (0, "ORT_DISABLE_ALL"),
    "cuda tf32=1": (1, "ORT_ENABLE_ALL"),
}


def _run(path: Path, contract, providers: list, level: str | None, feeds: dict):
    """A session with the runtime's options for the module (``session_options``), its graph
    optimization level replaced by ``level`` unless None."""
    import onnxruntime as ort

    from litefocus.engine.backends import open_session, session_options

    options = session_options(providers, contract.module)
    if level is not None:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    session = open_session(path, providers, contract.module, options)
    names = contract.output_names
    return dict(zip(names, session.run(names, feeds), strict=True)), session.get_providers()[0]


def _graphs(engines: Path) -> list[tuple[str, Path, object]]:
    """(label, graph, contract) of the text engine and every fp32 entry's modules, the contracts
    rebuilt from the manifest as the runtime rebuilds them."""
    from litefocus.engine.entries import load_manifest

    manifest = load_manifest(engines)
    graphs = []
    if manifest.text is not None:
        graphs.append(("text", engines / manifest.text.files["onnx"].path, manifest.text.contract))
    for name, entry in sorted(manifest.entries.items()):
        if entry.precision == "fp32":
            for module in entry.modules.values():
                graphs.append((f"{name}/{module.name}", engines / module.files["onnx"].path, module.contract))
    return graphs


def compare_providers(engines: Path, seed: int = 1) -> list[dict]:
    """One row per (graph, variant): max |CUDA - CPU| / RMS(CPU) and max abs, per output, on the
    contract's own sample inputs (those validation uses)."""
    from litefocus.export.validate import compare

    rows = []
    for label, path, contract in _graphs(engines):
        feeds = contract.numpy_inputs(seed)
        want, _ = _run(path, contract, ["CPUExecutionProvider"], "ORT_ENABLE_ALL", feeds)
        for variant, (tf32, level) in VARIANTS.items():
            providers = [("CUDAExecutionProvider", {"use_tf32": tf32}), "CPUExecutionProvider"]
            got, provider = _run(path, contract, providers, level, feeds)
            errors = {out: compare(got[out], w) for out, w in want.items()}
            rows.append({"graph": label, "variant": variant, "provider": provider, "outputs": errors})
    return rows
