"""The diffusers attention processors that run LiteFocus (and, for export, fused dense attention).

Both follow diffusers' ``AttnProcessor2_0`` step for step (projections, optional norms, output
projection, residual, rescale) and swap only the attention core:
  * ``LiteFocusAttnProcessor``: the static LiteFocus form, grid (fastest under PyTorch's SDPA) or,
    given an ``attend``, packed (one dense multi-head attention a fused op can take; export);
  * ``PackedSelfAttnProcessor``: plain self-attention through an ``attend`` in the packed layout
    (the UNet's dense levels and the VAE's mid-block, when export fuses attention).
Per-call state (the global sample) lives on the handle, never in ``cross_attention_kwargs``: the
AudioLDM2 UNet does not forward those to its transformer blocks.
"""

from __future__ import annotations

from typing import Protocol

import torch

from litefocus.attention import FocusSpec, PackedAttend, focus_attention_grid, focus_attention_packed
from litefocus.config import LiteFocusConfig


class GlobalSampleSource(Protocol):
    """What a LiteFocus processor reads per call: the config, and its layer's global sample.

    ``litefocus.installer.LiteFocusHandle`` is the one implementation; naming only what the processor
    uses keeps this module free of the installer (which imports the processor).
    """

    config: LiteFocusConfig

    def layer_indices(self, layer: int, n_tokens: int, device: torch.device) -> torch.Tensor | None:
        """The global sample [S] or [B, S] for one call of ``layer`` over ``n_tokens`` tokens, or None."""
        ...


class _SelfAttention:
    """AttnProcessor2_0's shell for self-attention without a mask; subclasses give ``core``."""

    name = "self-attention"

    def project(self, attn, x: torch.Tensor) -> tuple:
        """x: [B, N, C] -> the (q, k, v) that ``core`` takes: [B, N, H*D] each (an export form may
        pack them, e.g. k = v = one key-value projection)."""
        return attn.to_q(x), attn.to_k(x), attn.to_v(x)

    def core(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, N, H*D] -> [B, N, H*D]."""
        raise NotImplementedError

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError(
                f"{type(self).__name__} on {self.name}: got encoder_hidden_states, but it only replaces "
                "self-attention; cross-attention modules must keep their own processor"
            )
        if attention_mask is not None:
            raise ValueError(
                f"{type(self).__name__} on {self.name}: self-attention masks are not supported (AudioLDM2 "
                "passes none)"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        q, k, v = self.project(attn, hidden_states)  # [B, N, H*D] each
        if attn.norm_q is not None or attn.norm_k is not None:  # per head: [B, H, N, D] and back
            b, n, c = q.shape
            d = c // attn.heads

            def per_head(x: torch.Tensor, norm) -> torch.Tensor:
                if norm is None:
                    return x
                return norm(x.view(b, n, attn.heads, d).transpose(1, 2)).transpose(1, 2).reshape(b, n, c)

            q, k = per_head(q, attn.norm_q), per_head(k, attn.norm_k)
        out = self.core(attn, q, k, v).to(q.dtype)  # [B, N, H*D]

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class LiteFocusAttnProcessor(_SelfAttention):
    """Processor for one patched self-attention module (layer ``layer`` of ``handle``).

    ``attend``: None runs the grid form; a packed dense attention runs the packed form through it.
    """

    def __init__(
        self,
        handle: GlobalSampleSource,
        layer: int,
        name: str,
        freq_bins: int,
        attend: PackedAttend | None = None,
    ):
        self.handle = handle
        self.layer = layer
        self.name = name
        self.freq_bins = freq_bins
        self.attend = attend

    def __repr__(self) -> str:
        form = "grid" if self.attend is None else "packed"
        return (
            f"LiteFocusAttnProcessor(layer={self.layer}, name={self.name!r}, freq_bins={self.freq_bins}, "
            f"form={form})"
        )

    def with_attend(self, attend: PackedAttend | None) -> LiteFocusAttnProcessor:
        return LiteFocusAttnProcessor(self.handle, self.layer, self.name, self.freq_bins, attend)

    def spec(self, attn) -> FocusSpec:
        """The attention this layer computes on ``attn``'s heads: its grid, scale and form."""
        return FocusSpec(self.freq_bins, self.handle.config.same_frequency, attn.scale, self.attend)

    def core(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, c = q.shape  # token n = t * F + f
        if n % self.freq_bins != 0:
            raise ValueError(
                f"LiteFocus on {self.name}: {n} tokens do not form a [T, {self.freq_bins}] grid; the UNet "
                "latent must have the frequency size LiteFocus was installed for"
            )
        heads = attn.heads
        idx = self.handle.layer_indices(self.layer, n, k.device)  # [S], [B, S] or None
        spec = self.spec(attn)
        if self.attend is not None:
            return focus_attention_packed(q, k, v, heads, spec, idx)
        d = c // heads
        q, k, v = (x.view(b, n, heads, d).transpose(1, 2) for x in (q, k, v))  # [B, H, N, D]
        out = focus_attention_grid(q, k, v, spec, idx)  # [B, H, T, F, D]
        return out.permute(0, 2, 3, 1, 4).reshape(b, n, heads * d)  # [B, N, H*D]


class PackedSelfAttnProcessor(_SelfAttention):
    """Dense self-attention through ``attend`` (packed layout), e.g. a fused op while exporting."""

    def __init__(self, attend: PackedAttend, name: str = "self-attention"):
        self.attend = attend
        self.name = name

    def __repr__(self) -> str:
        return f"PackedSelfAttnProcessor(name={self.name!r})"

    def core(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attend(q, k, v, attn.heads, attn.scale)
