#!/usr/bin/env bash
# The whole job end to end, offline, on CPU or GPU, in about 15 minutes on 2 CPU cores:
#   corpus + tokenizer (made locally) -> distill-prep (Beam) -> teacher pretraining (MLM, DeepSpeed)
#   -> export -> DistilBERT distillation (DeepSpeed, 2 processes) -> export -> eval table.
# Usage: launch/demo.sh [OUT_DIR]   (default demo_out). Each stage that already finished is skipped,
# and the training stages resume from their checkpoints, so an interrupted demo continues.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
OUT=${1:-demo_out}
NUM_PROCS=${NUM_PROCS:-2}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
stage() { printf '\n=== %s ===\n' "$*"; }
start=$(date +%s)

stage "1/7 corpus: text shipped with Python (pydoc topics + stdlib docstrings)"
[ -s "$OUT/corpus/stdlib_docstrings.txt" ] || distill-demo-assets corpus "$OUT/corpus"
wc -w "$OUT"/corpus/*.txt

stage "2/7 WordPiece tokenizer trained on the corpus"
[ -f "$OUT/tokenizer/tokenizer.json" ] || distill-demo-assets tokenizer "$OUT"/corpus/*.txt --output "$OUT/tokenizer" --vocab-size 8000

stage "3/7 distill-prep: Apache Beam DirectRunner, 2 worker processes"
if [ ! -f "$OUT/data/manifest.json" ]; then
    overwrite=()
    [ -d "$OUT/data" ] && overwrite=(--overwrite)  # an unfinished earlier attempt (no manifest)
    distill-prep --input "$OUT/corpus" --tokenizer "$OUT/tokenizer" --output "$OUT/data" \
        --max-seq-len 128 --validation-fraction 0.02 --workers 2 "${overwrite[@]}"
fi

stage "4/7 teacher: a 4-layer BERT pretrained with masked LM by the same trainer (distillation losses off)"
if [ ! -f "$OUT/teacher/config.json" ]; then
    deepspeed --num_gpus "$NUM_PROCS" --master_port "${MASTER_PORT:-29500}" --module distill \
        --config configs/demo_teacher.yaml data.path="$OUT/data" output_dir="$OUT/teacher_run"
    distill-export --checkpoint "$OUT/teacher_run" --output "$OUT/teacher"
fi

stage "5/7 distillation: DistilBERT objective into a 2-layer student, DeepSpeed ZeRO-2, $NUM_PROCS processes"
deepspeed --num_gpus "$NUM_PROCS" --master_port "${MASTER_PORT:-29500}" --module distill \
    --config configs/demo.yaml teacher.path="$OUT/teacher" data.path="$OUT/data" output_dir="$OUT/student_run"

stage "6/7 export the student as a Hugging Face model"
distill-export --checkpoint "$OUT/student_run" --output "$OUT/student" --overwrite

stage "7/7 evaluation on the held-out split"
distill-eval --model "$OUT/student" --teacher "$OUT/teacher" --data "$OUT/data" --json "$OUT/eval.json"
python - "$OUT/student" <<'PY'
import sys
from transformers import pipeline
fill = pipeline("fill-mask", model=sys.argv[1])
for guess in fill("the list is sorted in [MASK] order.")[:3]:
    print(f"  fill-mask: {guess['sequence']!r} ({guess['score']:.3f})")
PY
echo
echo "demo finished in $(( $(date +%s) - start ))s; outputs in $OUT/ (TensorBoard: tensorboard --logdir $OUT)"
