"""`distillrun torchrun [torchrun options] <stage> [overrides]`: torchrun, refusals said once.

Under a bare `torchrun -m distillrun <stage>`, a refused stage prints its one line from process 0,
then torchrun adds its own failure report (some 40 lines) and exits 1. This command runs the same
torchrun in process: the dispatcher checks the stage's config before any process starts, and when
the processes stop on a refusal (exit 2, the others terminated), it exits 2 with that one line
alone. Any other failure keeps torchrun's report and exit code.
"""

from __future__ import annotations

import logging
import os

from distillrun.errors import UserError

REFUSED = 2  # a stage's exit code for bad input (errors.UserError)


def split(args: list[str], stages: list[str]) -> tuple[list[str], str, list[str]]:
    """(torchrun's options, the stage, the stage's overrides): the options are everything before
    the first word that names a stage."""
    for i, word in enumerate(args):
        if word in stages:
            return args[:i], word, args[i + 1 :]
    raise UserError(
        "name the stage after torchrun's options, e.g. `distillrun torchrun --nproc_per_node=2 "
        f"distill <overrides>` (stages: {', '.join(stages)})"
    )


def launch(options: list[str], stage: str, overrides: list[str]) -> int:
    """Run `torchrun <options> -m distillrun <stage> <overrides>`; its exit code, or 2 when the
    processes stopped on a refusal (their line is already printed)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parsed = get_args_parser().parse_args([*options, "-m", "distillrun", stage, *overrides])
    # torchrun prints a banner when it sets this itself; `threads=` sets each process's threads.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    elastic.setLevel(logging.CRITICAL)  # its "failed (exitcode: 2)" line; the report is below
    try:
        run(parsed)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if REFUSED in codes and all(c == REFUSED or c < 0 for c in codes):  # < 0: terminated
            return REFUSED
        raise
    finally:
        elastic.setLevel(level)
    return 0
