"""litefocus.export: static per-bucket ONNX / TensorRT export of a LiteFocus UNet (issue 3)."""


def main(argv: list[str] | None = None) -> int:
    """``litefocus-export`` (one line naming the [export] extra when its libraries are missing)."""
    from litefocus.extras import run_with_extra

    return run_with_extra(
        "litefocus-export",
        "export",
        ("torch", "diffusers", "transformers", "onnxscript"),
        "litefocus.export.cli:main",
        argv,
    )
