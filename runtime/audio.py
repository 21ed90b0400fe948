"""What a generation returns, and writing it as a WAV file atomically."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from litefocus.engine.fileio import atomic_path


@dataclass(frozen=True)
class Audio:
    waveform: np.ndarray  # float32 [samples], 16 kHz, cropped to int(seconds * 16000)
    sample_rate: int
    seconds: float
    bucket: str  # the engine entry that produced it
    seed: int | None = None  # the seed the noise and LiteFocus samples came from (drawn when not given)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds


def write_wav(path: str | os.PathLike, audio: Audio, *, float32: bool = False) -> Path:
    """Write 16-bit PCM (or 32-bit float) WAV via a temp file + rename: never a half-written file."""
    import soundfile as sf

    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(
            f"output directory {path.parent} does not exist; create it or choose another -o path"
        )
    with atomic_path(path) as tmp:
        subtype = "FLOAT" if float32 else "PCM_16"
        sf.write(tmp, audio.waveform, audio.sample_rate, subtype=subtype, format="WAV")
    return path
