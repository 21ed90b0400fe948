#!/usr/bin/env bash
# The serving-only install (`pip install .`: no torch, diffusers, transformers or exporter) writes
# the same WAV as the full install from engines the full install exported. Run from the full venv.
# The serving venv gets the OLDEST onnxruntime pyproject.toml allows (its floor), so CI runs the
# floor; another ONNX Runtime may round a sample differently: the WAVs must agree to 4 int16 steps.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
args=("a dog barks in the rain" --seconds 0.64 --steps 3 --seed 1 --negative-prompt "a cat" -q)

python -c "import sys; sys.path.insert(0, 'tests'); from tiny_models import save_tiny_pipeline; save_tiny_pipeline(sys.argv[1])" "$work/pipe"
litefocus-export --model "$work/pipe" --seconds 0.64 --text-len 8 --out "$work/engines" -q > /dev/null
litefocus-generate "${args[@]}" --engines "$work/engines" -o "$work/full.wav"

floor=$(sed -n 's/^ *"onnxruntime>=\([0-9.]*\)",.*/\1/p' pyproject.toml)
if [ -z "$floor" ]; then
    echo "serving venv: no onnxruntime floor in pyproject.toml" >&2
    exit 1
fi
python3 -m venv "$work/serve"
"$work/serve/bin/pip" install -q . "onnxruntime==$floor" 2> >(grep -v "is ignored: it is neither" >&2)
"$work/serve/bin/python" -c "import onnxruntime as o, sys; sys.exit(o.__version__ != sys.argv[1])" "$floor"
if "$work/serve/bin/python" -c "import torch" 2> /dev/null; then
    echo "serving venv: torch is importable; it must not be" >&2
    exit 1
fi
"$work/serve/bin/litefocus-generate" "${args[@]}" --engines "$work/engines" -o "$work/serve.wav"
python - "$work/full.wav" "$work/serve.wav" << 'EOF'
import sys
import wave

import numpy as np


def pcm(path):
    with wave.open(path) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.int32)


full, serve = pcm(sys.argv[1]), pcm(sys.argv[2])
steps = int(np.abs(full - serve).max()) if full.shape == serve.shape else None
if steps is None or steps > 4:
    sys.exit(f"serving venv: the WAVs differ ({'in length' if steps is None else f'by {steps} int16 steps'})")
EOF
if "$work/serve/bin/litefocus-export" --seconds 1 2> "$work/err"; then exit 1; fi
grep -q "pip install" "$work/err"
echo "serving venv (onnxruntime $floor): same WAV as the full install; $(du -sh "$work/serve" | cut -f1) venv (full: $(du -sh "${VIRTUAL_ENV:-.venv}" | cut -f1))"
