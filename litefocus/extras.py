"""Console entry points that need an optional extra check for it first (stdlib only).

A serving-only ``pip install litefocus`` has no torch: ``litefocus-export`` and ``litefocus-bench``
then answer with one line naming the extra to install instead of an ImportError traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys


def run_with_extra(prog: str, extra: str, modules: tuple[str, ...], target: str, argv=None) -> int:
    """``target`` ("package.module:function") called with ``argv``, or exit status 2 and one line
    when one of ``modules`` is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        how = f"pip install 'litefocus[{extra}]'"
        if "torch" in modules:  # the CPU build first, or pip pulls CUDA's
            how = f"pip install torch==2.13.0 && {how} (torch first: its CPU build)"
        print(
            f"{prog}: error: {', '.join(missing)} not installed; install the {extra} extra: {how}",
            file=sys.stderr,
        )
        return 2
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)(argv)
