"""`python -m distill --config ...` (and `deepspeed --module distill ...`) runs distill-train."""

import sys

from distill.cli import train_main

sys.exit(train_main())
