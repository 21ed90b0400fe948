"""litefocus.export: static per-bucket ONNX / TensorRT engines of an AudioLDM2 model with LiteFocus.

``litefocus-export`` (``cli.py``) turns the request (``plan.ExportOptions``) into a plan
(``plan.ExportPlan``) and builds it (``build.py``): per bucket, the UNet and decode graphs are
exported, audited and validated against PyTorch (``stages.py``), plus one text-conditioning engine
(``text_engine.py``), into an engine directory the torch-free runtime serves from.
"""


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
