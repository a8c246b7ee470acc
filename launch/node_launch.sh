#!/usr/bin/env bash
# Start this node's share of a multi-node run without ssh: run it once on every node, each with its
# own NODE_RANK (Slurm does this through srun, see launch/slurm.sbatch). Every node must see the
# same output_dir (a shared filesystem) for checkpoints.
#
#   NNODES=2 NODE_RANK=0 GPUS_PER_NODE=8 MASTER_ADDR=node0 MASTER_PORT=29500 \
#       launch/node_launch.sh --config configs/distilbert.yaml teacher.path=... data.path=... output_dir=...
#
# GPUS_PER_NODE processes start on this node (on CPU: that many gloo processes); world size is
# NNODES x GPUS_PER_NODE. The job's arguments go to distill-train unchanged (DISTILL_MODULE=distill.cache: to the
# teacher cache's ranks, `python -m distill.cache`, instead).
# SIGTERM, SIGINT or SIGUSR1 to this script on any one node: the ranks of every node checkpoint after the
# same step and each node's script exits 99 (see launch/supervise.sh).
set -euo pipefail
: "${NNODES:?set NNODES (number of nodes)}" "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (host name or address of node 0)}"
GPUS_PER_NODE=${GPUS_PER_NODE:-1}
MASTER_PORT=${MASTER_PORT:-29500}
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
    echo "node_launch.sh: error: NODE_RANK=$NODE_RANK must be in 0..$((NNODES - 1)); set it per node" >&2
    exit 2
fi
# The launcher derives the world layout from a hostfile; in --no_ssh mode the names are only labels.
hostfile=$(mktemp "${TMPDIR:-/tmp}/distill-hostfile.XXXXXX")
trap 'rm -f "$hostfile"' EXIT
for ((i = 0; i < NNODES; i++)); do echo "node$i slots=$GPUS_PER_NODE"; done > "$hostfile"
[ -n "${VIRTUAL_ENV:-}" ] || { here=$(cd "$(dirname "$0")/.." && pwd); [ -x "$here/.venv/bin/deepspeed" ] && export PATH="$here/.venv/bin:$PATH"; }
rank_logs=()  # RANK_LOG_DIR: one log file per rank (the launcher's --enable_each_rank_log)
[ -n "${RANK_LOG_DIR:-}" ] && mkdir -p "$RANK_LOG_DIR" && rank_logs=(--enable_each_rank_log "$RANK_LOG_DIR")
source "$(dirname "$0")/supervise.sh"  # SIGTERM/SIGINT/SIGUSR1: all ranks of all nodes checkpoint, exit 99
run_supervised deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$NODE_RANK" "${rank_logs[@]}" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module "${DISTILL_MODULE:-distill}" "$@"
