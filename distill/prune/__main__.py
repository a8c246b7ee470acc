"""`python -m distill.prune` / `deepspeed --module distill.prune`: distill-prune (distill/prune/cli.py)."""

import sys

from distill.prune.cli import main

sys.exit(main())
