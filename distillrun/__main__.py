"""`python -m distillrun <stage> ...`: the same as the `distillrun` command."""

from distillrun.cli import main

main()
