"""litefocus: LiteFocus sparse attention for diffusers AudioLDM2, and static engines built from it.

import litefocus
handle = litefocus.install(pipe.unet, litefocus.LiteFocusConfig())
litefocus.uninstall(pipe.unet)

The names below load on first use (PEP 562): ``import litefocus.runtime`` (the serving path) must
not pull torch in through this package's ``__init__``.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "FocusSpec": "litefocus.attention",
    "litefocus_attention": "litefocus.attention",
    "reference_litefocus_attention": "litefocus.attention",
    "Bucket": "litefocus.buckets",
    "LiteFocusConfig": "litefocus.config",
    "LiteFocusHandle": "litefocus.installer",
    "get_handle": "litefocus.installer",
    "install": "litefocus.installer",
    "uninstall": "litefocus.installer",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'litefocus' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
