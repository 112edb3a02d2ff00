"""`distillrun <stage> [hydra overrides]`: a dispatcher in front of one Hydra app per stage.

Hydra has no subcommands, so this pops the stage name from argv and calls that stage's own
`@hydra.main`, which then sees an ordinary Hydra command line (overrides, -m, --cfg, --help,
launchers, shell completion). This module must not import torch: `distillrun --help` is instant.
"""

from __future__ import annotations

import difflib
import importlib
import itertools
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from distillrun.config import STAGES, sweep_values

USAGE = "usage: distillrun <stage> [hydra overrides]   (distillrun <stage> --help for its options)"


def print_help() -> None:
    print(USAGE)
    print("\nstages (each writes a run folder under outputs/<stage>/ that later stages consume):")
    for name, (_, _, about) in STAGES.items():
        print(f"  {name:<16}{about}")
    print(
        "\nexamples:\n"
        "  distillrun train-teachers teachers.n=5\n"
        "  distillrun distill T=20 alpha=0.9\n"
        "  distillrun distill -m T=1,2,4,8 alpha=0.5,0.9\n"
        "  distillrun specialists dataset=hierarchical && distillrun evaluate\n"
        '\nshell completion: eval "$(distillrun -sc install=bash)"'
    )


def fail(message: str, stage: str | None = None) -> None:
    where = f"distillrun {stage}" if stage else "distillrun"
    print(f"{where}: error: {message}", file=sys.stderr)
    sys.exit(2)


def complete(args: list[str]) -> None:
    """Shell completion: stage names first, then the chosen stage's own Hydra completion."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    choosing_stage = len(words) == 1 or (len(words) == 2 and not line.endswith(" "))
    if any(a.startswith("query=") for a in args) and (not words or choosing_stage):
        typed = words[1] if len(words) == 2 else ""
        print(" ".join(s for s in STAGES if s.startswith(typed)))
        return
    stage = words[1] if len(words) >= 2 and words[1] in STAGES else next(iter(STAGES))
    if len(words) >= 2 and words[1] == stage:
        # Hydra's completion expects "<app> <overrides>": drop the stage word.
        os.environ["COMP_LINE"] = line.replace(f" {stage}", "", 1)
    run_stage(stage, args)


def precheck(stage: str, args: list[str]) -> None:
    """Refuse bad overrides and values before Hydra creates a run folder.

    Hydra itself reports an unknown group choice or key with exit code 1 and a trace, and a
    bad value would only surface inside the job. Each sweep value is composed and validated.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from distillrun.config import check_group_choices, validate
    from distillrun.errors import UserError

    parsed = get_args_parser().parse_args(args)
    if parsed.config_path or parsed.config_name or parsed.config_dir or parsed.experimental_rerun:
        return  # the user brings their own configs: leave it all to Hydra
    if parsed.help or parsed.hydra_help or parsed.shell_completion:
        return
    try:
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
        check_group_choices(overrides)
        combos = _combinations(overrides)
        if parsed.cfg or parsed.info:
            if parsed.multirun and len(combos) > 1:
                raise UserError(f"--{'cfg' if parsed.cfg else 'info'} shows one config: drop -m")
            _compose(stage, combos[0])  # unknown keys still get one line, not Hydra's trace
            return
        cfgs = [_compose(stage, combo) for combo in combos]
        for cfg in cfgs:
            validate(stage, cfg)
        _check_output_root(cfgs[0].paths.output_root)
    except (UserError, HydraException, OmegaConfBaseException) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(e, UserError):
            fail(str(e), stage)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        fail(f"{' '.join(lines[:3])} (see `distillrun {stage} --cfg job` for the keys)", stage)


def _combinations(overrides: list) -> list[list[str]]:
    """The first value of every sweep, then each sweep value once: enough to check every value."""
    fixed, sweeps = [], []
    for o in overrides:
        if o.key_or_group.startswith("hydra"):
            continue  # launcher and output settings: Hydra's own business
        prefix = "++" if o.is_force_add() else "+" if o.is_add() else "~" if o.is_delete() else ""
        key = f"{prefix}{o.get_key_element()}"
        if o.is_sweep_override():
            values = sweep_values(o)
            if values is None:
                continue
            sweeps.append([f"{key}={v}" for v in values])
        else:
            fixed.append(o.input_line)
    first = [s[0] for s in sweeps]
    combos = [fixed + first]
    for i, values in enumerate(sweeps):
        for v in values[1:]:
            combos.append(fixed + first[:i] + [v] + first[i + 1 :])
    return [list(c) for c, _ in itertools.groupby(combos)]


def _compose(stage: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="distillrun.conf", version_base="1.3"):
        return compose(config_name=STAGES[stage][1], overrides=overrides)


def _check_output_root(output_root: str) -> None:
    """Create the output root now, so an unwritable one is one line instead of Hydra's trace."""
    from distillrun.errors import UserError

    try:
        Path(output_root).mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=output_root, prefix=".write-test-")
        probe.close()
    except OSError as e:
        raise UserError(
            f"paths.output_root={output_root} cannot be written ({e.strerror or e}): "
            "choose a writable folder with paths.output_root=..."
        ) from e


def run_stage(stage: str, args: list[str]) -> None:
    module = importlib.import_module(STAGES[stage][0])
    sys.argv = [sys.argv[0], *args]
    module.main()


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_help()
        return
    if argv[0] in ("-sc", "--shell-completion"):
        complete(argv)
        return
    stage, args = argv[0], argv[1:]
    if stage not in STAGES:
        close = difflib.get_close_matches(stage, STAGES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        fail(f"unknown stage '{stage}': {hint}stages are {', '.join(STAGES)}")
    precheck(stage, args)
    try:
        run_stage(stage, args)
    except BrokenPipeError:  # `distillrun distill --help | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
