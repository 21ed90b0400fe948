"""Install LiteFocus into a diffusers AudioLDM2 UNet through attention processors.

``install`` finds every self-attention module at the configured level(s), gives it a
``LiteFocusAttnProcessor`` and returns a ``LiteFocusHandle`` that owns the per-call global sample:
set it from a tensor (``set_indices``; export routes an engine input through it) or let the handle
draw it from its seeded ``torch.Generator``. ``uninstall`` puts the original processor objects back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from litefocus.attention import is_tracing
from litefocus.buckets import LATENT_FREQ_BINS
from litefocus.config import LiteFocusConfig
from litefocus.processor import LiteFocusAttnProcessor

logger = logging.getLogger(__name__)

_HANDLE_ATTR = "_litefocus_handle"


def _audioldm2_unet_class():
    from diffusers import AudioLDM2UNet2DConditionModel

    return AudioLDM2UNet2DConditionModel


def _check_unet(unet) -> None:
    cls = _audioldm2_unet_class()
    if isinstance(unet, cls):
        return
    hint = " (a pipeline was passed: use pipe.unet)" if hasattr(unet, "unet") else ""
    raise ValueError(
        f"LiteFocus needs a diffusers AudioLDM2UNet2DConditionModel, got {type(unet).__name__}{hint}"
    )


def self_attention_freq_bins(unet, latent_freq_bins: int = LATENT_FREQ_BINS) -> dict[str, int]:
    """Name -> frequency bins of every self-attention module in the UNet, in forward order.

    Each down block works at the resolution it receives and halves it if it downsamples; each up
    block works at the resolution of the matching skip level (as the UNet's own upsampling does).
    """
    blocks: list[tuple[str, torch.nn.Module, int]] = []
    bins = latent_freq_bins
    level_bins = []
    for i, block in enumerate(unet.down_blocks):
        blocks.append((f"down_blocks.{i}", block, bins))
        level_bins.append(bins)
        if getattr(block, "downsamplers", None) is not None:
            bins = math.ceil(bins / 2)
    if unet.mid_block is not None:
        blocks.append(("mid_block", unet.mid_block, bins))
    for i, block in enumerate(unet.up_blocks):
        blocks.append((f"up_blocks.{i}", block, level_bins[len(level_bins) - 1 - i]))
    found: dict[str, int] = {}
    for prefix, block, block_bins in blocks:
        for name, module in block.named_modules():
            if is_self_attention(module):
                found[f"{prefix}.{name}"] = block_bins
    return found


def is_self_attention(module: torch.nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention

    return isinstance(module, Attention) and not module.is_cross_attention


def draw_global_indices(generator: torch.Generator, n_tokens: int, num: int) -> torch.Tensor:
    """One cross-frequency sample: ``num`` distinct token indices of ``n_tokens`` (int64, CPU)."""
    return torch.randperm(n_tokens, generator=generator)[:num]


class LiteFocusHandle:
    """What ``install`` returns: the patched modules and the global-sample state they share.

    Layer ``i`` is ``modules[i]``, in forward order.
    """

    def __init__(self, unet, config: LiteFocusConfig, freq_bins: dict[str, int], latent_freq_bins: int):
        self.config = config
        self.latent_freq_bins = latent_freq_bins
        self.modules: tuple[str, ...] = tuple(freq_bins)
        self.freq_bins: tuple[int, ...] = tuple(freq_bins.values())
        self._unet = unet
        self._generator = torch.Generator().manual_seed(config.seed)
        self._indices: list[torch.Tensor] | None = None
        self._indices_max: list[int] | None = None
        self._fixed: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._originals: dict[str, object] = {}
        self._hook = None

    @property
    def num_layers(self) -> int:
        return len(self.modules)

    def num_global(self, n_tokens: int) -> int:
        """S = floor(r * N) for a layer that sees ``n_tokens`` tokens (0 with cross-frequency off)."""
        return self.config.num_global(n_tokens)

    def manual_seed(self, seed: int) -> None:
        """Reseed the generator behind the ``"resample"`` draws (same seed -> same samples)."""
        self._generator.manual_seed(int(seed))

    def set_indices(self, indices: torch.Tensor | Sequence[torch.Tensor] | None) -> None:
        """Use these global indices for every following call, until ``set_indices(None)``.

        ``indices``: int tensor [layers, S] (layer i = ``modules[i]``), or one tensor per layer, [S]
        or [B, S] (one sample per batch row; levels with different token counts need different S). S must equal ``num_global(N)`` of the
        layer when it runs. Works with traced tensors, so an export can feed them from an input.
        """
        if indices is None:
            self._indices, self._indices_max = None, None
            return
        if isinstance(indices, torch.Tensor):
            if indices.dim() != 2 or indices.shape[0] != self.num_layers:
                raise ValueError(
                    f"set_indices: expected an int tensor [layers={self.num_layers}, S], got shape "
                    f"{tuple(indices.shape)}"
                )
            rows = list(indices.unbind(0))
        else:
            rows = list(indices)
            if len(rows) != self.num_layers or not all(
                isinstance(r, torch.Tensor) and r.dim() in (1, 2) for r in rows
            ):
                raise ValueError(
                    f"set_indices: expected {self.num_layers} int tensors [S] or [B, S], one per patched layer"
                )
        for r in rows:
            if r.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"set_indices: indices must be int32 or int64, got {r.dtype}")
        row_max = None  # per layer: each is checked against that layer's own token count
        if not is_tracing():
            lo = min((int(r.min()) for r in rows if r.numel()), default=0)
            if lo < 0:
                raise ValueError(f"set_indices: negative index {lo}; indices address tokens 0..N-1")
            if isinstance(indices, torch.Tensor) and indices.numel():
                row_max = indices.amax(dim=1).tolist()  # one device sync for all layers
            else:
                row_max = [int(r.max()) if r.numel() else -1 for r in rows]
        self._indices, self._indices_max = rows, row_max

    def layer_indices(self, layer: int, n_tokens: int, device: torch.device) -> torch.Tensor | None:
        """The global sample for one call of ``layer`` over ``n_tokens`` tokens (None: no global part)."""
        n_tokens = int(n_tokens)  # a traced shape becomes a constant: engines have static shapes
        num = self.num_global(n_tokens)
        name = self.modules[layer]
        if num == 0:
            if not self.config.same_frequency:
                raise ValueError(
                    f"LiteFocus on {name}: sparse_ratio={self.config.sparse_ratio} samples 0 of {n_tokens} "
                    "tokens and same_frequency is off, so queries have no keys; raise sparse_ratio"
                )
            return None
        if self._indices is not None:
            idx = self._indices[layer]
            if idx.shape[-1] != num:
                raise ValueError(
                    f"LiteFocus on {name}: set_indices gave {idx.shape[-1]} indices, but this layer sees "
                    f"{n_tokens} tokens and needs S = floor({self.config.sparse_ratio} * {n_tokens}) = {num}"
                )
            if self._indices_max is not None and self._indices_max[layer] >= n_tokens:
                raise ValueError(
                    f"LiteFocus on {name}: set_indices holds index {self._indices_max[layer]}, outside "
                    f"[0, {n_tokens})"
                )
            return idx.to(device)
        if self.config.index_mode == "fixed":
            key = (layer, n_tokens, torch.device(device))
            if key not in self._fixed:
                self._fixed[key] = fixed_global_indices(self.config.seed, layer, n_tokens, num).to(device)
            return self._fixed[key]
        if is_tracing():
            raise ValueError(
                f"LiteFocus on {name}: tracing with index_mode='resample' needs the global sample as an "
                "input: call handle.set_indices(indices) inside the traced forward, or use index_mode='fixed'"
            )
        return draw_global_indices(self._generator, n_tokens, num).to(device)

    def uninstall(self) -> None:
        uninstall(self._unet)


def fixed_global_indices(seed: int, layer: int, n_tokens: int, num: int) -> torch.Tensor:
    """The ``index_mode="fixed"`` sample of one layer: stable per (seed, layer, token count).

    Drawn with numpy so that, under tracing, it is a plain constant (no random op in the graph).
    """
    rng = np.random.default_rng([seed, layer, n_tokens])
    return torch.from_numpy(rng.permutation(n_tokens)[:num].astype(np.int64))


def _check_latent_hook(handle: LiteFocusHandle):
    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if (
            isinstance(sample, torch.Tensor)
            and sample.dim() == 4
            and sample.shape[-1] != handle.latent_freq_bins
        ):
            raise ValueError(
                f"LiteFocus was installed for latents with {handle.latent_freq_bins} frequency bins, got a "
                f"sample of shape {tuple(sample.shape)}; pass install(..., latent_freq_bins={sample.shape[-1]})"
            )

    return hook


def install(
    unet, config: LiteFocusConfig | None = None, *, latent_freq_bins: int = LATENT_FREQ_BINS
) -> LiteFocusHandle:
    """Put a LiteFocus processor on every self-attention module at ``config.freq_bins`` levels.

    Cross-attention modules are left untouched. Returns the handle; ``uninstall(unet)`` restores
    the original processors.
    """
    config = LiteFocusConfig() if config is None else config
    if not isinstance(config, LiteFocusConfig):
        raise ValueError(f"install: config must be a LiteFocusConfig, got {type(config).__name__}")
    _check_unet(unet)
    if getattr(unet, _HANDLE_ATTR, None) is not None or any(
        isinstance(p, LiteFocusAttnProcessor) for p in unet.attn_processors.values()
    ):
        raise ValueError("LiteFocus is already installed on this UNet; call litefocus.uninstall(unet) first")
    all_bins = self_attention_freq_bins(unet, latent_freq_bins)
    chosen = {name: b for name, b in all_bins.items() if b in config.freq_bins}
    missing = sorted(set(config.freq_bins) - set(chosen.values()), reverse=True)
    if missing:
        have = sorted(set(all_bins.values()), reverse=True)
        raise ValueError(
            f"install: this UNet has no self-attention level with {missing} frequency bins (latent has "
            f"{latent_freq_bins}); its levels have {have}: set LiteFocusConfig(freq_bins=...) to some of those"
        )
    handle = LiteFocusHandle(unet, config, chosen, latent_freq_bins)
    for layer, (name, bins) in enumerate(chosen.items()):
        module = unet.get_submodule(name)
        handle._originals[name] = module.processor
        module.set_processor(LiteFocusAttnProcessor(handle, layer, name, bins))
    handle._hook = unet.register_forward_pre_hook(_check_latent_hook(handle), with_kwargs=True)
    setattr(unet, _HANDLE_ATTR, handle)
    logger.info(
        "LiteFocus installed on %d self-attention modules (freq_bins %s)", len(chosen), config.freq_bins
    )
    return handle


def uninstall(unet) -> None:
    """Restore the processors ``install`` replaced (the same objects, so outputs match bit for bit)."""
    handle = getattr(unet, _HANDLE_ATTR, None)
    if handle is None:
        raise ValueError("uninstall: LiteFocus is not installed on this UNet")
    for name, original in handle._originals.items():
        unet.get_submodule(name).set_processor(original)
    handle._hook.remove()
    delattr(unet, _HANDLE_ATTR)
    logger.info("LiteFocus uninstalled from %d modules", len(handle._originals))


def get_handle(unet) -> LiteFocusHandle | None:
    """The handle of the LiteFocus installed on ``unet``, or None."""
    return getattr(unet, _HANDLE_ATTR, None)
