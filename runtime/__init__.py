"""litefocus.runtime: bucket choice, sampling loop, decode and WAV output (issue 4)."""
