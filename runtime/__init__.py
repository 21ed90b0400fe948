"""litefocus.runtime: load an engine directory once, generate long audio many times (no torch).

from litefocus.runtime import Runtime
with Runtime.load("engines") as rt:
    audio = rt.generate("rain on a tin roof", seconds=80, seed=1)
"""

from litefocus.runtime.audio import Audio, write_wav
from litefocus.runtime.options import Conditioning, GenerateOptions
from litefocus.runtime.runtime import Runtime

__all__ = ["Audio", "Conditioning", "GenerateOptions", "Runtime", "write_wav"]
