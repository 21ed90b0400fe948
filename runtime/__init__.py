"""litefocus.runtime: load an engine directory once, generate long audio many times.

from litefocus.runtime import Runtime
with Runtime.load("engines") as rt:
    audio = rt.generate("rain on a tin roof", seconds=80, seed=1)
"""

from litefocus.runtime.audio import Audio, write_wav
from litefocus.runtime.runtime import Runtime
from litefocus.runtime.sampling import Conditioning

__all__ = ["Audio", "Conditioning", "Runtime", "write_wav"]
