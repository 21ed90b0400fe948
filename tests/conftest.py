"""Test options and fixtures; the tiny models themselves live in tiny_models.py."""

from __future__ import annotations

import pytest
import torch

from tiny_models import make_tiny_unet, make_tiny_vae, make_tiny_vocoder


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: full-size model; run with --runslow")
    skip_gpu = pytest.mark.skip(reason="gpu: no CUDA device on this machine")
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    skip_trt = pytest.mark.skip(reason="tensorrt: the tensorrt package is not installed")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(skip_trt)


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random AudioLDM2 (UNet, VAE, vocoder) saved as a diffusers directory, once per module."""
    root = tmp_path_factory.mktemp("tiny-audioldm2")
    make_tiny_unet().save_pretrained(root / "unet")
    make_tiny_vae().save_pretrained(root / "vae")
    make_tiny_vocoder().save_pretrained(root / "vocoder")
    return root
