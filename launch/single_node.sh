#!/usr/bin/env bash
# Train on one machine with N processes (one per GPU; on CPU, N processes over gloo):
#   launch/single_node.sh NUM_PROCS --config configs/distilbert.yaml teacher.path=... data.path=... output_dir=...
# Rerunning the same command resumes from the newest complete checkpoint in output_dir.
# SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 to this script: every rank checkpoints after the same step and the
# script exits 99; see launch/supervise.sh.
set -euo pipefail
NUM_PROCS=${1:?usage: launch/single_node.sh NUM_PROCS --config RECIPE [key=value ...]}
shift
MASTER_PORT=${MASTER_PORT:-29500}
source "$(dirname "$0")/supervise.sh"
run_supervised deepspeed --num_gpus "$NUM_PROCS" --master_port "$MASTER_PORT" --module distill "$@"
