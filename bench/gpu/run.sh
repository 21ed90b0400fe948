#!/usr/bin/env bash
# The prepared GPU measurement (see bench/gpu/README.md). Run from the checkout root:
#
#   OUT=/some/dir bench/gpu/run.sh [stash] [A] [A2] [B]   # on the lent GPU machine (default: A)
#   bench/gpu/run.sh --dry-run                       # anywhere, no GPU: the rehearsal CI runs
#
#   stash  copy the onnxruntime-gpu parts carried in this command (.ort/c*/) to /tmp, where they
#          wait for the next commands on the same warm machine
#   A      PyTorch fp16: eager at 10-160 s, torch.compile + CUDA graphs at 80 s, <= 6 minutes
#   A2     PyTorch fp16: torch.compile (default mode) at 80 s, <= 5 minutes
#   B      the fp16 export of the 80 s bucket + ONNX Runtime CUDA EP rows, once every part is there
#   C      the GPU-form engine (CUDA graphs on/off) against litefocus-compile reduce-overhead,
#          25-step generations at 80 and 160 s, and the form's pieces one by one (<= 9 minutes)
#   check  step-level batching on the CUDA EP equals requests run alone (bench/gpu/batching_check.py;
#          tiny model, about a minute), once every onnxruntime-gpu part is there
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

WHEELS=${LITEFOCUS_WHEELS:-.whl}      # phase A wheels (bench/gpu/fetch-wheels.sh)
PARTS=${LITEFOCUS_ORT_PARTS:-.ort}    # onnxruntime-gpu in parts: .ort/c1 ... .ort/cN
STASH=/tmp/litefocus-ort
SITE=/tmp/litefocus-site
SITE_ORT=/tmp/litefocus-site-ort
PY=${PYTHON:-python3}
LIST=bench/gpu/wheels.txt
export PYTHONSAFEPATH=1  # the checkout's litefocus/ folder must not shadow the installed package
export LITEFOCUS_SOURCE_DIR=$PWD  # the bench records this tree's git commit (or $LITEFOCUS_GIT_COMMIT)

die() { echo "run.sh: $*" >&2; exit 2; }

# "A name==version --hash=sha256:..." lines of one phase, as a pip requirements file
requirements() { grep -E "^$1 " "$LIST" | cut -d' ' -f2- > "$2"; }

check_list() {  # every pinned line: phase, exact version, sha256
  local bad
  bad=$(grep -vE '^(#|$)' "$LIST" | grep -vE '^[AB] [A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.+-]* --hash=sha256:[0-9a-f]{64}$')
  [ -z "$bad" ] || die "$LIST: not 'PHASE name==version --hash=sha256:HEX': $bad"
  grep -qE '^A diffusers==' "$LIST" || die "$LIST: diffusers is not pinned for phase A"
  grep -qE '^B onnxruntime-gpu==' "$LIST" || die "$LIST: onnxruntime-gpu is not pinned for phase B"
}

check_fetched() {  # wheels already fetched here must match their pins
  [ -d "$WHEELS" ] || { echo "run.sh: $WHEELS/ not fetched here (bench/gpu/fetch-wheels.sh fills it)"; return 0; }
  "$PY" - "$LIST" "$WHEELS" <<'PY' || exit 2
import hashlib, pathlib, re, sys
lines = [l.split() for l in pathlib.Path(sys.argv[1]).read_text().splitlines() if l[:2] == "A "]
for _, req, h in lines:
    name, version = req.split("==")
    stem = re.sub(r"[-_.]+", "_", name).lower() + "-" + version + "-"
    found = [p for p in pathlib.Path(sys.argv[2]).glob("*.whl") if p.name.lower().startswith(stem)]
    if not found:
        sys.exit(f"run.sh: {req} is pinned but not in {sys.argv[2]}/; run bench/gpu/fetch-wheels.sh")
    if hashlib.sha256(found[0].read_bytes()).hexdigest() != h.split(":", 1)[1]:
        sys.exit(f"run.sh: {found[0]} does not match its pinned hash; run bench/gpu/fetch-wheels.sh again")
print(f"run.sh: {len(lines)} phase A wheels in place and matching their pins")
PY
}

dry_run() {
  check_list
  check_fetched
  bash -n bench/gpu/run.sh bench/gpu/fetch-wheels.sh || die "syntax error in bench/gpu/*.sh"
  "$PY" -m py_compile bench/gpu/batching_check.py bench/gpu/profile_engine.py || die "bench/gpu/*.py do not compile"
  local out=${OUT:-}
  DRY_TMP=$(mktemp -d) || die "cannot make a temporary directory"
  trap 'rm -rf "$DRY_TMP"' EXIT
  local tmp=$DRY_TMP
  if [ -n "$out" ]; then
    mkdir -p "$out" && [ -w "$out" ] || die "OUT=$out is not a writable directory"
  fi
  "$PY" -m litefocus.bench.gpu_plan check --out "$tmp/results" || exit 1
  echo "run.sh: dry run passed (phases A, A2, B and C planned; outputs fit the machine's limits)"
}

stash() {
  mkdir -p "$STASH"
  local n=0 p
  for p in "$PARTS"/c*/*.part-*; do
    [ -e "$p" ] || continue
    cp "$p" "$STASH/" && n=$((n + 1))
  done
  echo "run.sh: stashed $n part(s); $(ls "$STASH" | grep -c '\.part-') in $STASH"
}

install_base() {  # the carried wheels and litefocus itself, into $SITE (the image's packages stay)
  [ -n "${OUT:-}" ] || die "OUT is not set: name the directory whose files come back"
  local req
  req=$(mktemp)
  requirements A "$req"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --require-hashes \
    --find-links "$WHEELS" --target "$SITE" --upgrade -r "$req" || die "installing $WHEELS/ failed"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation \
    --target "$SITE" --upgrade . || die "installing litefocus failed"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
}

install_ort() {  # reassemble the parts, check the pin, install into $SITE_ORT (first on the path)
  local first total n wheel req
  first=$(ls "$STASH"/*.part-1-of-* 2>/dev/null | head -1)
  [ -n "$first" ] || { echo "run.sh: no onnxruntime-gpu parts in $STASH: phase B skipped"; return 1; }
  total=${first##*-of-}
  n=$(ls "$STASH" | grep -c '\.part-')
  [ "$n" = "$total" ] || { echo "run.sh: $n of $total onnxruntime-gpu parts in $STASH: phase B skipped"; return 1; }
  wheel="$STASH/$(basename "${first%.part-*}")"
  for i in $(seq 1 "$total"); do cat "${wheel}.part-$i-of-$total"; done > "$wheel"
  req=$(mktemp)
  requirements B "$req"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --require-hashes \
    --find-links "$STASH" --target "$SITE_ORT" --upgrade -r "$req" || die "installing onnxruntime-gpu failed"
  export PYTHONPATH="$SITE_ORT:$PYTHONPATH"
}

phase() {
  local log="$OUT/$1.log"
  mkdir -p "$OUT"
  {
    echo "== $(date -u +%FT%TZ) phase $1 at $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import torch, diffusers, onnxruntime as o; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| onnxruntime', o.__version__, o.get_available_providers())"
  } >> "$log" 2>&1
  "$PY" -m litefocus.bench.gpu_plan run --phase "$1" --out "$OUT"
}

profile_engine() {  # the kernels of one 80 s UNet step and one decode of phase C's engine (60 s at most)
  local libs
  libs=$("$PY" -c "from litefocus.bench.gpu_plan import cuda_library_dirs; print(':'.join(cuda_library_dirs()))")
  echo "== $(date -u +%FT%TZ) profile of the phase C engine (bench/gpu/profile_engine.py)"
  LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO=1 \
    timeout -k 10 60 "$PY" bench/gpu/profile_engine.py --engines /tmp/litefocus-engines --seconds 80 --out "$OUT"
}

[ $# -gt 0 ] || set -- A
[ "$1" = "--dry-run" ] && { dry_run; exit $?; }
rc=0
installed=
for step in "$@"; do
  case "$step" in
    stash) stash ;;
    A|A2) [ -n "$installed" ] || { install_base; installed=1; }; phase "$step" || rc=1 ;;
    B) [ -n "$installed" ] || { install_base; installed=1; }
       if install_ort; then phase B || rc=1; fi ;;
    C) [ -n "$installed" ] || { install_base; installed=1; }
       if install_ort; then
         phase C || rc=1
         profile_engine >> "$OUT/C.log" 2>&1 || rc=1
         tail -20 "$OUT/C.log"
       fi ;;
    check) [ -n "$installed" ] || { install_base; installed=1; }
       if install_ort; then
         mkdir -p "$OUT"
         "$PY" bench/gpu/batching_check.py --out "$OUT" > "$OUT/check.log" 2>&1 || rc=1
         tail -3 "$OUT/check.log"
       fi ;;
    *) die "unknown step '$step'; use --dry-run, stash, A, A2, B, C or check" ;;
  esac
done
exit $rc
