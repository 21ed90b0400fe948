#!/usr/bin/env bash
# The serving-only install (`pip install .`: no torch, diffusers, transformers or exporter) writes
# the same WAV as the full install from engines the full install exported. Run from the full venv.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
args=("a dog barks in the rain" --seconds 0.64 --steps 3 --seed 1 --negative-prompt "a cat" -q)

python -c "import sys; sys.path.insert(0, 'tests'); from tiny_models import save_tiny_pipeline; save_tiny_pipeline(sys.argv[1])" "$work/pipe"
litefocus-export --model "$work/pipe" --seconds 0.64 --text-len 8 --out "$work/engines" -q > /dev/null
litefocus-generate "${args[@]}" --engines "$work/engines" -o "$work/full.wav"

python3 -m venv "$work/serve"
"$work/serve/bin/pip" install -q . 2> >(grep -v "is ignored: it is neither" >&2)
if "$work/serve/bin/python" -c "import torch" 2> /dev/null; then
    echo "serving venv: torch is importable; it must not be" >&2
    exit 1
fi
"$work/serve/bin/litefocus-generate" "${args[@]}" --engines "$work/engines" -o "$work/serve.wav"
cmp "$work/full.wav" "$work/serve.wav"
if "$work/serve/bin/litefocus-export" --seconds 1 2> "$work/err"; then exit 1; fi
grep -q "pip install" "$work/err"
echo "serving venv: same WAV as the full install; $(du -sh "$work/serve" | cut -f1) venv (full: $(du -sh "${VIRTUAL_ENV:-.venv}" | cut -f1))"
