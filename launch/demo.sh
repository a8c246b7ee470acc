#!/usr/bin/env bash
# The whole job end to end, offline, on CPU or GPU (about 11 minutes on 2 CPU cores, idle):
#   corpus (text shipped with Python) -> distill-prep (Beam) with the demo teacher's tokenizer
#   -> DistilBERT distillation of the shipped demo teacher (DeepSpeed, 2 processes) -> the same student
#   trained without the teacher -> export both -> eval table against the teacher and the
#   most-frequent-token baseline -> fill-mask probes.
# Usage: launch/demo.sh [--train-teacher] [OUT_DIR]   (default OUT_DIR: demo_out, or demo_out_trained_teacher)
#   --train-teacher  pretrain the teacher here with configs/demo_teacher.yaml (2 processes; ~25 min more on
#                    2 CPU cores) instead of using the one shipped in assets/demo_teacher, which that config made.
# Each stage that already finished is skipped, and the training stages resume from their checkpoints,
# so an interrupted demo continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
TRAIN_TEACHER=0
OUT=""
for arg in "$@"; do
    case "$arg" in
        --train-teacher) TRAIN_TEACHER=1 ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "demo.sh: error: unknown option $arg (usage: launch/demo.sh [--train-teacher] [OUT_DIR])" >&2; exit 2 ;;
        *) [ -z "$OUT" ] || { echo "demo.sh: error: one OUT_DIR only (got $OUT and $arg)" >&2; exit 2; }; OUT=$arg ;;
    esac
done
if [ -z "$OUT" ]; then
    OUT=demo_out
    [ "$TRAIN_TEACHER" = 1 ] && OUT=demo_out_trained_teacher  # its students belong to another teacher
fi
# 2 processes on CPU (gloo); on a CUDA machine one per GPU, at most 2 (the recipes' batch of 64 = 2 x 32)
NUM_PROCS=${NUM_PROCS:-$(python -c "import torch; n = torch.cuda.device_count(); print(min(n, 2) if n else 2)" 2>/dev/null || echo 2)}
PORT=${MASTER_PORT:-29500}
SHIPPED=assets/demo_teacher  # weights + config + the tokenizer every demo stage uses (see its README.md)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
stage() { printf '\n=== %s ===\n' "$*"; }
start=$(date +%s)

stage "1/7 corpus: text shipped with Python (pydoc topics + stdlib docstrings)"
[ -s "$OUT/corpus/stdlib_docstrings.txt" ] || distill-demo-assets corpus "$OUT/corpus"
wc -w "$OUT"/corpus/*.txt

stage "2/7 distill-prep: Apache Beam DirectRunner, 2 worker processes, the demo teacher's WordPiece tokenizer"
[ -f "$OUT/data/manifest.json" ] || distill-prep --input "$OUT/corpus" --tokenizer "$SHIPPED" --output "$OUT/data" \
    --max-seq-len 128 --validation-fraction 0.05 --workers 2

if [ "$TRAIN_TEACHER" = 1 ]; then
    stage "3/7 teacher: a 4-layer BERT pretrained here with masked LM (configs/demo_teacher.yaml, $NUM_PROCS processes)"
    TEACHER="$OUT/teacher"
    if [ ! -f "$TEACHER/config.json" ]; then
        deepspeed --num_gpus "$NUM_PROCS" --master_port "$PORT" --module distill \
            --config configs/demo_teacher.yaml data.path="$OUT/data" output_dir="$OUT/teacher_run"
        distill-export --checkpoint "$OUT/teacher_run" --output "$TEACHER"
    fi
else
    stage "3/7 teacher: the shipped demo teacher ($SHIPPED, made by configs/demo_teacher.yaml; --train-teacher redoes it)"
    TEACHER="$SHIPPED"
fi

stage "4/7 distillation: DistilBERT objective into a 2-layer student, DeepSpeed ZeRO-2, $NUM_PROCS processes"
deepspeed --num_gpus "$NUM_PROCS" --master_port "$PORT" --module distill \
    --config configs/demo.yaml teacher.path="$TEACHER" data.path="$OUT/data" output_dir="$OUT/student_run"

stage "5/7 the same student without the teacher: masked LM only, random init, same steps and data"
deepspeed --num_gpus "$NUM_PROCS" --master_port "$PORT" --module distill \
    --config configs/demo_no_teacher.yaml data.path="$OUT/data" output_dir="$OUT/no_teacher_run"

stage "6/7 export both students as Hugging Face models"
distill-export --checkpoint "$OUT/student_run" --output "$OUT/student" --overwrite
distill-export --checkpoint "$OUT/no_teacher_run" --output "$OUT/student_no_teacher" --overwrite

stage "7/7 evaluation on the held-out split, and fill-mask probes"
python -m distill.tools.evaluate --model "$OUT/student" --name "distilled student" --teacher "$TEACHER" \
    --compare "without teacher=$OUT/student_no_teacher" --data "$OUT/data" --json "$OUT/eval.json"
echo
distill-demo-assets probe "teacher=$TEACHER" "distilled student=$OUT/student" "without teacher=$OUT/student_no_teacher"
echo
echo "demo finished in $(( $(date +%s) - start ))s; outputs in $OUT/ (TensorBoard: tensorboard --logdir $OUT)"
