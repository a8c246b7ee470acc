#!/usr/bin/env bash
# Run any stage of the job inside the image: distill-prep, distill-train, deepspeed ..., distill-export, distill-eval.
set -euo pipefail
if [ "$#" -eq 0 ]; then
    exec distill-train --help
fi
exec "$@"
