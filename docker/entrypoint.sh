#!/usr/bin/env bash
# Run any stage inside the image:
#   IMAGE distill-prep ... | distill-train ... | deepspeed --num_gpus N --module distill ... | distill-export ... | distill-eval ...
# Short names work too: prep, train, export, eval. With no arguments it prints distill-train's help.
set -euo pipefail
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
if [ "$#" -eq 0 ]; then
    exec distill-train --help
fi
case "$1" in
    prep|train|export|eval) stage="distill-$1"; shift; set -- "$stage" "$@" ;;
esac
if ! command -v "$1" > /dev/null 2>&1; then
    echo "entrypoint: error: unknown command '$1'; use distill-prep, distill-train, distill-export, distill-eval or deepspeed" >&2
    exit 2
fi
exec "$@"
