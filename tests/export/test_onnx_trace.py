"""The LiteFocus processor must not block ONNX export (the export stage itself is issue 3)."""

import numpy as np
import pytest
import torch

import litefocus
from litefocus import LiteFocusConfig
from tiny_models import make_tiny_unet, tiny_unet_inputs

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

FRAMES = 16
N8 = (FRAMES // 2) * 8


class WithIndices(torch.nn.Module):
    """UNet call whose LiteFocus global sample comes in as a tensor input."""

    def __init__(self, unet, handle):
        super().__init__()
        self.unet, self.handle = unet, handle

    def forward(self, sample, timestep, ehs, ehs1, mask1, indices):
        self.handle.set_indices(indices)
        try:
            return self.unet(
                sample,
                timestep,
                encoder_hidden_states=ehs,
                encoder_hidden_states_1=ehs1,
                encoder_attention_mask_1=mask1,
            ).sample
        finally:
            self.handle.set_indices(None)


class Plain(torch.nn.Module):
    """UNet call with positional inputs (the global sample, if any, is baked or drawn inside)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, ehs, ehs1, mask1):
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=ehs,
            encoder_hidden_states_1=ehs1,
            encoder_attention_mask_1=mask1,
        ).sample


def export_and_run(module, args, path):
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=18)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"RandomUniform", "RandomNormal", "Multinomial", "NonZero"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    return session.run(None, feeds)[0]


def test_traces_with_indices_as_an_input(tmp_path):
    unet = make_tiny_unet()
    handle = litefocus.install(unet)
    s = handle.num_global(N8)
    g = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(N8, generator=g)[:s] for _ in range(handle.num_layers)]).int()
    x = tiny_unet_inputs(frames=FRAMES)
    args = (
        x["sample"],
        x["timestep"],
        x["encoder_hidden_states"],
        x["encoder_hidden_states_1"],
        x["encoder_attention_mask_1"],
        indices,
    )
    module = WithIndices(unet, handle).eval()
    got = export_and_run(module, args, tmp_path / "unet.onnx")
    with torch.no_grad():
        want = module(*args).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # The indices really are an input: other indices give the PyTorch answer for those indices.
    other = torch.stack([torch.randperm(N8, generator=g)[:s] for _ in range(handle.num_layers)]).int()
    session = ort.InferenceSession(str(tmp_path / "unet.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), (*args[:-1], other), strict=True)}
    with torch.no_grad():
        want_other = module(*args[:-1], other).numpy()
    np.testing.assert_allclose(session.run(None, feeds)[0], want_other, rtol=1e-4, atol=1e-4)
    assert np.abs(want_other - want).max() > 1e-5


def test_traces_in_fixed_mode(tmp_path):
    unet = make_tiny_unet()
    litefocus.install(unet, LiteFocusConfig(index_mode="fixed", seed=2))
    x = tiny_unet_inputs(frames=FRAMES)
    args = (
        x["sample"],
        x["timestep"],
        x["encoder_hidden_states"],
        x["encoder_hidden_states_1"],
        x["encoder_attention_mask_1"],
    )

    module = Plain(unet).eval()
    got = export_and_run(module, args, tmp_path / "fixed.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(got, module(*args).numpy(), rtol=1e-4, atol=1e-4)


def test_tracing_resample_without_indices_is_a_clear_error():
    unet = make_tiny_unet()
    litefocus.install(unet)
    x = tiny_unet_inputs(frames=FRAMES)
    args = tuple(x.values())
    with torch.no_grad(), pytest.raises(ValueError, match="set_indices"):
        torch.jit.trace(Plain(unet).eval(), args, check_trace=False)
