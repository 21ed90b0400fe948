#!/usr/bin/env bash
# Fill the ignored folders that bench/gpu/run.sh installs from on the air-gapped GPU machine:
#   .whl/            phase A wheels (diffusers, ...), carried with the first command
#   .ort/c1 ... cN   onnxruntime-gpu cut into parts of PART_MIB MiB, one folder per command
# Exactly the pins of bench/gpu/wheels.txt (Python 3.12, manylinux x86_64), hashes checked.
set -euo pipefail
cd "$(dirname "$0")/../.."
PART_MIB=${PART_MIB:-54}
LIST=bench/gpu/wheels.txt
PY=${PYTHON:-python3}

download() {  # $1 = requirement, $2 = folder
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$2" "$1"
}

wheel_of() {  # the downloaded wheel of requirement $1 in folder $2
  local name=${1%%==*} version=${1##*==}
  ls "$2" | grep -i "^$(echo "$name" | tr -- '-.' '__')-$version-.*\.whl$" | head -1
}

verify() {  # $1 = file, $2 = sha256
  [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ] || { echo "fetch-wheels: $1 does not match its pin $2" >&2; exit 1; }
}

mkdir -p .whl .ort/dl
grep -E '^[AB] ' "$LIST" | while read -r phase req hash; do
  sha=${hash#--hash=sha256:}
  dir=.whl; [ "$phase" = B ] && dir=.ort/dl
  download "$req" "$dir"
  file="$dir/$(wheel_of "$req" "$dir")"
  verify "$file" "$sha"
  echo "fetch-wheels: $req ($(du -h "$file" | cut -f1))"
  if [ "$phase" = B ]; then
    rm -rf .ort/c* .ort/split && mkdir -p .ort/split
    split -b "${PART_MIB}M" -d -a 2 "$file" .ort/split/part-
    parts=(.ort/split/part-*)
    total=${#parts[@]}
    for i in $(seq 1 "$total"); do
      mkdir -p ".ort/c$i"
      mv "${parts[$((i - 1))]}" ".ort/c$i/$(basename "$file").part-$i-of-$total"
    done
    rmdir .ort/split
    echo "fetch-wheels: $(basename "$file") in $total parts: .ort/c1 ... .ort/c$total"
  fi
done
echo "fetch-wheels: done; bench/gpu/README.md says which command carries which folder"
