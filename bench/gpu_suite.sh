#!/usr/bin/env bash
# GPU evidence suite (issue 29): bench/gpu_suite.sh [--smoke] OUT
#
# Runs the steps of bench/gpu_suite_steps.py in priority order on one GPU (or, with --smoke, every step at tiny sizes
# on a CPU). Each step writes OUT/<step>.json (atomically, when it ends) and OUT/<step>.log, under its own time bound
# (`timeout`); a rerun skips steps whose .json exists, so a cut or failed run continues where it stopped.
# OUT/summary.md at the end: the table for the README.
#   STEPS="a1 b"      steps to run (default: all, in the order below)
#   BOUND_a1=300      seconds for step a1 (each step has a default; the defaults of a1 b a2 c fit ~9 minutes)
#   PYTHON=...        interpreter (default .venv/bin/python, else python3); nothing needs the internet
set -u
SMOKE=""
if [ "${1:-}" = "--smoke" ]; then SMOKE="--smoke"; shift; fi
OUT=${1:?usage: bench/gpu_suite.sh [--smoke] OUT}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PATH="$(dirname "$PY"):$PATH"

ALL="a1 b a2 c b2 a3 a4 d0 d1 d2 d3 d4 d5 d6 d7 d8 d9"  # d0 = quality teacher, d1..d8 = variant x seed, d9 = table
[ -n "$SMOKE" ] && ALL="a1 b a2 c a3 a4 d0 d1 d2"               # smoke: teacher, one student, its table
if [ -n "$SMOKE" ]; then
    declare -A BOUND=([a1]=240 [a2]=120 [a3]=120 [a4]=120 [b]=240 [c]=180 [d]=300)
else  # one GPU: a1 + b + a2 + c = 540 s (9 minutes, one 10-minute call); the rest in the next calls
    declare -A BOUND=([a1]=200 [a2]=120 [a3]=150 [a4]=150 [b]=160 [b2]=120 [c]=60 [d]=280)
fi
failed=0
for step in ${STEPS:-$ALL}; do
    if [ -s "$OUT/$step.json" ]; then
        echo "$step: done before ($OUT/$step.json), skipped"
        continue
    fi
    var="BOUND_$step"
    bound=${!var:-${BOUND[$step]:-${BOUND[${step:0:1}]:-300}}}
    echo "$step: running (bound ${bound} s, log $OUT/$step.log)"
    start=$(date +%s)
    timeout --kill-after=15 "$bound" "$PY" bench/gpu_suite_steps.py "$step" --out "$OUT" $SMOKE >"$OUT/$step.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ] && [ -s "$OUT/$step.json" ]; then
        echo "$step: done in $(($(date +%s) - start)) s"
    else
        [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why="cut at its bound of ${bound} s" || why="exit $rc"
        echo "$step: FAILED ($why); see $OUT/$step.log: $(tail -n 1 "$OUT/$step.log")"
        failed=1
    fi
done
"$PY" bench/gpu_suite_steps.py summary --out "$OUT" >/dev/null 2>"$OUT/summary.log" || failed=1
echo "summary: $OUT/summary.md"
exit $failed
