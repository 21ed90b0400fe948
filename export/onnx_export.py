"""Static ONNX export of a contract's module, and the module that exposes the UNet by contract.

Every dimension is static (one graph per bucket): the tracer's shape arithmetic is folded into
constants (``fold.py``); weights go to ONE external-data file next to the graph. The TorchScript exporter (``dynamo=False``) is used: it exports the full AudioLDM2 UNet in
seconds and matches eager to ~1e-6, where the dynamo exporter takes minutes.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

import onnx
import torch

from litefocus.buckets import LATENT_FREQ_BINS, Bucket
from litefocus.config import LiteFocusConfig
from litefocus.engine.contract import UNetContract, index_input_name
from litefocus.export.contrib import finish_contrib_graph
from litefocus.export.fold import drop_unused, fold_static_shapes
from litefocus.export.layout import cancel_transposes
from litefocus.export.winograd import rewrite_convs
from litefocus.installer import self_attention_freq_bins

logger = logging.getLogger(__name__)

OPSET = 18


class UNetExportModule(torch.nn.Module):
    """unet(...) with positional inputs in contract order; LiteFocus indices arrive as inputs.

    Each ``litefocus_indices_f{F}`` input [B, layers, S] holds, per batch row, one sample per patched
    layer of that level in the handle's layer order; they are routed to the processors through
    ``handle.set_indices`` (layer i gets [B, S]), so every row attends with its own sample.
    """

    def __init__(self, unet, contract: UNetContract, handle=None):
        super().__init__()
        self.unet = unet
        self.contract = contract
        self.handle = handle
        if contract.index_levels and handle is None:
            raise ValueError("the contract has LiteFocus index inputs but no LiteFocus handle was given")
        self.index_names = [index_input_name(f) for f, _ in contract.index_levels]

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        encoder_hidden_states_1,
        encoder_attention_mask_1,
        *indices,
    ):
        if self.index_names:
            by_level = dict(zip([f for f, _ in self.contract.index_levels], indices, strict=True))
            cursor = dict.fromkeys(by_level, 0)
            rows = []
            for f in self.handle.freq_bins:  # layer order
                if f not in by_level:  # a level whose sample is empty at this bucket (S = 0)
                    rows.append(torch.zeros(0, dtype=torch.int32))
                    continue
                rows.append(by_level[f][:, cursor[f]])  # [B, S]
                cursor[f] += 1
            self.handle.set_indices(rows)
        try:
            return self.unet(
                sample,
                timestep,
                encoder_hidden_states=encoder_hidden_states,
                encoder_hidden_states_1=encoder_hidden_states_1,
                encoder_attention_mask_1=encoder_attention_mask_1,
                return_dict=False,
            )[0]
        finally:
            if self.index_names:
                self.handle.set_indices(None)


def _save_with_weights(model: onnx.ModelProto, onnx_path: Path, data_name: str) -> None:
    """``model`` to ``onnx_path``, every tensor over 1 KB in the one external-data file ``data_name``.

    onnx refuses to write when a file named ``data_name`` exists relative to the current directory
    (not the graph's): the save runs from the graph's folder, so a stray ``unet.onnx.data`` where
    litefocus-export is started does not fail the export."""
    onnx_path = Path(onnx_path).absolute()
    cwd = os.getcwd()
    os.chdir(onnx_path.parent)
    try:
        onnx.save_model(
            model,
            str(onnx_path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
    finally:
        os.chdir(cwd)


def export_onnx(
    module: torch.nn.Module,
    contract,
    onnx_path: Path,
    *,
    seed: int = 0,
    conv: str = "direct",
    channels_last: bool = False,
) -> tuple[Path, Path]:
    """Trace ``module`` at the contract's static shapes into ``onnx_path`` + ``<name>.data``.

    The module must already be in the contract's precision and on its device (the sample inputs go
    where its parameters are; fp16 is traced on a GPU: CPU fp16 kernels are slow or missing).
    ``conv="winograd"`` rewrites its 3x3 convolutions
    (``export/winograd.py``). ``channels_last``: the module was traced in the GPU form's NHWC blocks
    (``export/gpu_form.py``), whose edge Transposes are then cancelled (``export/layout.py``).
    Returns (graph, weights) paths.
    """
    onnx_path = Path(onnx_path)
    raw_dir = onnx_path.parent / (onnx_path.stem + ".raw")
    raw_dir.mkdir(parents=True, exist_ok=True)
    raw = raw_dir / onnx_path.name
    device = next(module.parameters(), torch.empty(0)).device
    args = tuple(contract.sample_inputs(seed)[name].to(device) for name in contract.input_names)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module.eval(),
            args,
            str(raw),
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=True,
            input_names=contract.input_names,
            output_names=contract.output_names,
        )
    # one external-data file, then fold the shape arithmetic on the weight-free graph
    data_name = onnx_path.name + ".data"
    _save_with_weights(onnx.load(str(raw), load_external_data=True), onnx_path, data_name)
    shutil.rmtree(raw_dir)
    graph = fold_static_shapes(onnx.load(str(onnx_path), load_external_data=False))
    if finish_contrib_graph(graph):
        drop_unused(graph.graph)  # the pass-throughs' shape constants
    if channels_last:
        logger.info("%s: %d layout transposes cancelled", onnx_path.name, cancel_transposes(graph))
    onnx.save_model(graph, str(onnx_path))
    data = onnx_path.parent / data_name
    if conv == "winograd":  # on the folded graph, where every shape is static
        model = onnx.load(str(onnx_path), load_external_data=True)
        logger.info("%s: %d 3x3 convolutions in Winograd form", onnx_path.name, rewrite_convs(model))
        data.unlink()  # onnx appends to an existing data file; the weights are in memory
        _save_with_weights(model, onnx_path, data_name)
    logger.info("exported %s (%.1f MB weights)", onnx_path.name, data.stat().st_size / 2**20)
    return onnx_path, data


def unet_contract_for(unet, bucket: Bucket, config: LiteFocusConfig | None, **kwargs) -> UNetContract:
    """The contract of ``unet`` (its conditioning widths and patched layers) for ``bucket``."""
    dims = unet.config.cross_attention_dim
    first = dims[0] if isinstance(dims[0], (list, tuple)) else dims
    cross = [d for d in first if d is not None]
    if len(cross) != 2:
        raise ValueError(f"not an AudioLDM2 UNet: expected [None, gpt2_dim, t5_dim] cross dims, got {first}")
    levels: tuple[tuple[int, int], ...] = ()
    if config is not None and config.index_mode == "resample" and config.cross_frequency:
        bins = list(self_attention_freq_bins(unet, LATENT_FREQ_BINS).values())
        levels = tuple((f, bins.count(f)) for f in config.freq_bins if bucket.num_global(config, f) > 0)
    return UNetContract(
        bucket=bucket, gpt2_dim=cross[0], t5_dim=cross[1], litefocus=config, index_levels=levels, **kwargs
    )
