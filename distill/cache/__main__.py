"""`python -m distill.cache ...` (and `deepspeed --module distill.cache ...`, `torchrun -m distill.cache ...`) runs
`distill-cache --ranks`: this process is one rank of the launcher's process group (distill/cache/ranks.py)."""

import sys

from distill.cache.cli import main
from distill.train.distributed import end_finished_rank

code = main(ranks=True)
end_finished_rank(code)  # a multi-rank run: exit without the interpreter teardown that sometimes aborts under gloo
sys.exit(code)
