# Sourced by launch/single_node.sh and launch/node_launch.sh: `run_supervised CMD...` runs the DeepSpeed
# launcher CMD as a supervised child and exits with the outcome of its workers.
#
# - CMD runs in its own session, so a signal to this script's process group (Ctrl-C, `kill -- -PGID`,
#   a scheduler) reaches this script only; DeepSpeed's launcher would otherwise die of it (SIGTERM,
#   SIGUSR1) or kill the workers (SIGINT) and exit 143/1 whatever the workers did.
# - SIGTERM, SIGINT or SIGUSR1 to this script: SIGUSR1 goes to CMD's process group, once a second until
#   it exits. DeepSpeed's launcher processes ignore it (started with SIGUSR1 ignored, they install no
#   handler); every worker finishes its step, all ranks checkpoint together and exit 99 (distill/train/preemption.py).
# - When CMD exits, this waits until no process of its group is left, then exits with CMD's code:
#   0 finished, 99 checkpointed on request (rerun the same command to resume), anything else a failure.
# - DISTILL_LAUNCH_PID: the workers also stop (checkpoint, exit 99) if this script or the launcher dies.

run_supervised() {
    local launcher rc=0 orphans=0
    stop_signal=""
    trap '_stop_notice TERM' TERM
    trap '_stop_notice INT' INT
    trap '_stop_notice USR1' USR1
    export DISTILL_LAUNCH_PID=$$
    ( trap '' USR1; exec setsid "$@" ) &
    launcher=$!
    echo "[launch] launcher pid $launcher (process group $launcher); SIGTERM/SIGINT/SIGUSR1 to pid $$ checkpoints and exits 99" >&2
    while kill -0 "$launcher" 2>/dev/null; do
        if [ -n "$stop_signal" ]; then  # again each second: a worker that has not installed its handler yet ignores it
            kill -USR1 -- "-$launcher" 2>/dev/null || true
            sleep 1
        else
            wait "$launcher" || true  # returns early when a trapped signal arrives
        fi
    done
    wait "$launcher" || rc=$?
    while kill -0 -- "-$launcher" 2>/dev/null; do  # workers outliving their launcher stop on their own
        orphans=1
        [ -z "$stop_signal" ] || kill -USR1 -- "-$launcher" 2>/dev/null || true
        sleep 1
    done
    if (( orphans && rc == 0 )); then
        echo "[launch] the launcher exited 0 before its workers (DeepSpeed reports a killed per-node launcher as 0); treating it as a failure" >&2
        rc=1
    fi
    if (( rc == 99 )); then
        echo "[launch] $(date +%T) the workers checkpointed on request: exit 99 (rerun the same command to resume)" >&2
    elif [ -n "$stop_signal" ]; then
        echo "[launch] $(date +%T) stop requested (SIG$stop_signal) but the launcher exited $rc" >&2
    fi
    exit "$rc"
}

_stop_notice() {
    [ -n "$stop_signal" ] || echo "[launch] $(date +%T) received SIG$1: asking every worker to finish its step, checkpoint and exit" >&2
    stop_signal=$1
}
