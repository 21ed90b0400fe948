"""litefocus: LiteFocus sparse attention for diffusers AudioLDM2, and static engines built from it.

import litefocus
handle = litefocus.install(pipe.unet, litefocus.LiteFocusConfig())
litefocus.uninstall(pipe.unet)
"""

from litefocus.attention import litefocus_attention, reference_litefocus_attention
from litefocus.buckets import Bucket
from litefocus.config import LiteFocusConfig
from litefocus.install import LiteFocusHandle, get_handle, install, uninstall

__version__ = "0.1.0"

__all__ = [
    "Bucket",
    "LiteFocusConfig",
    "LiteFocusHandle",
    "get_handle",
    "install",
    "litefocus_attention",
    "reference_litefocus_attention",
    "uninstall",
    "__version__",
]
