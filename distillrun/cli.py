"""`distillrun <stage> [hydra overrides]`: a dispatcher in front of one Hydra app per stage.

Hydra has no subcommands, so this pops the stage name from argv and calls that stage's own
`@hydra.main`, which then sees an ordinary Hydra command line (overrides, -m, --cfg, --help,
launchers, shell completion). This module must not import torch: `distillrun --help` is instant.
"""

from __future__ import annotations

import argparse
import atexit
import difflib
import importlib
import itertools
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from distillrun.config import RESUME_ENV, sweep_values
from distillrun.core import distributed
from distillrun.errors import UserError, interrupted_exit_code, stop_on_signals
from distillrun.integrations.search import space_combinations
from distillrun.runs import artifacts
from distillrun.stages import STAGES, config_name, module_name, training_stages

MIN_FREE_MB = 20  # below this a run cannot even write its config and first checkpoint
USAGE = "usage: distillrun <stage> [hydra overrides]   (distillrun <stage> --help for its options)"
RUNS_COMMAND = "runs"  # not a stage: lists the run folders the stages wrote
TORCHRUN_COMMAND = "torchrun"  # not a stage: a training stage under torchrun, refusals said once


def register_sweeper() -> None:
    """Make hydra/sweeper=optuna known to Hydra. An installed wheel's hydra_plugins/ is found by
    Hydra's plugin scan; an editable install (pip install -e) hides it from that scan."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.distillrun_search.optuna_sweeper import OptunaSearchSweeper

    Plugins.instance().register(OptunaSearchSweeper)


def print_help() -> None:
    print(USAGE)
    print("\nstages (each writes a run folder under outputs/<stage>/ that later stages consume):")
    for name, stage in STAGES.items():
        print(f"  {name:<16}{stage.about}")
    print(
        f"\n  {RUNS_COMMAND:<16}the run and sweep folders, newest first "
        f"(distillrun {RUNS_COMMAND} [stage]; --latest <stage>: one path)"
        f"\n  {TORCHRUN_COMMAND:<16}a training stage in several processes "
        f"(distillrun {TORCHRUN_COMMAND} --nproc_per_node=2 distill ...)"
    )
    print(
        "\nexamples:\n"
        "  distillrun train-teachers teachers.n=5\n"
        "  distillrun distill T=20 alpha=0.9\n"
        "  distillrun distill -m T=1,2,4,8 alpha=0.5,0.9\n"
        "  distillrun report outputs/distill/multirun/<timestamp>\n"
        "  distillrun train-teachers resume=outputs/train-teachers/<run>  (a killed run)\n"
        "  distillrun specialists dataset=hierarchical && distillrun evaluate\n"
        '\nshell completion: eval "$(distillrun -sc install=bash)"'
    )


def fail(message: str, stage: str | None = None) -> None:
    where = f"distillrun {stage}" if stage else "distillrun"
    if distributed.is_main():  # under torchrun, one line from process 0, not one per process
        print(f"{where}: error: {message}", file=sys.stderr)
    sys.exit(2)


def complete(args: list[str]) -> None:
    """Shell completion: stage names first, then the chosen stage's own Hydra completion."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    choosing_stage = len(words) == 1 or (len(words) == 2 and not line.endswith(" "))
    querying = any(a.startswith("query=") for a in args)
    if querying and (not words or choosing_stage):
        typed = words[1] if len(words) == 2 else ""
        commands = [*STAGES, RUNS_COMMAND, TORCHRUN_COMMAND]
        print(" ".join(s for s in commands if s.startswith(typed)))
        return
    if querying and words[1] == RUNS_COMMAND:
        typed = "" if line.endswith(" ") else words[-1]
        print(" ".join(w for w in [*STAGES, "--latest", "--root"] if w.startswith(typed)))
        return
    stage = words[1] if len(words) >= 2 and words[1] in STAGES else next(iter(STAGES))
    if len(words) >= 2 and words[1] == stage:
        # Hydra's completion expects "<app> <overrides>": drop the stage word.
        os.environ["COMP_LINE"] = line.replace(f" {stage}", "", 1)
    call_stage(stage, args)


def preset_as_choice(args: list[str]) -> list[str]:
    """`+experiment=x` -> `experiment=x`. Every stage declares `experiment: null` in its
    defaults, before `debug`, so that debug=tiny shrinks a preset's run too; Hydra's `+` (add
    a group) would clash with that declared default. Both spellings work, as Hydra's docs use
    `+experiment=`."""
    return [a[1:] if a.startswith("+experiment=") else a for a in args]


def parse_hydra_args(args: list[str]) -> argparse.Namespace:
    """Hydra's own reading of a command line (its flags and the overrides), as `@hydra.main`
    will read it. The one use of Hydra internals; tests/test_cli.py pins what we rely on."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(args)


def precheck(stage: str, args: list[str]) -> list[str]:
    """Refuse bad overrides and values before Hydra creates a run folder; return the args.

    Hydra itself reports an unknown group choice or key with exit code 1 and a trace, and a
    bad value would only surface inside the job. Each sweep value is composed and validated.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from distillrun.config import check_added_keys, check_group_choices, validate

    parsed = parse_hydra_args(args)
    if parsed.config_path or parsed.config_name or parsed.config_dir or parsed.experimental_rerun:
        return args  # the user brings their own configs: leave it all to Hydra
    if parsed.help or parsed.hydra_help or parsed.shell_completion:
        return args
    try:
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
        check_group_choices(overrides)
        check_added_keys(stage, overrides, lambda: _stage_keys(stage, []))
        combos = _combinations(overrides) + space_combinations(overrides)
        if parsed.cfg or parsed.info:
            if parsed.multirun and len(combos) > 1:
                raise UserError(f"--{'cfg' if parsed.cfg else 'info'} shows one config: drop -m")
            _compose(stage, combos[0])  # unknown keys still get one line, not Hydra's trace
            return args
        cfgs = [_compose(stage, combo) for combo in combos]
        for cfg in cfgs:
            validate(stage, cfg)
        if parsed.multirun:
            composed = {frozenset(c): cfg for c, cfg in zip(combos, cfgs, strict=True)}
            _check_every_job(stage, overrides, composed)
        _check_output_root(cfgs[0].paths.output_root)
        _refuse_held_folders(stage, overrides, parsed.multirun)
        _check_run_dir(overrides, parsed.multirun)
        if parsed.multirun:
            return _keys_from_swept_groups(stage, args, overrides)
        return args
    except (UserError, HydraException, OmegaConfBaseException) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(e, UserError):
            fail(str(e), stage)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        if "Available options" in str(e):  # a Hydra group choice, e.g. hydra/launcher=joblb
            text = " ".join(lines).split(" Config search path")[0]
            fail(re.sub(r"\s*Available options in '[^']+':", ": choose one of", text), stage)
        fail(f"{' '.join(lines[:3])} (see `distillrun {stage} --cfg job` for the keys)", stage)


def _hydra_key(override: Any) -> bool:
    return override.key_or_group == "hydra" or override.key_or_group.startswith("hydra.")


def _combinations(overrides: list) -> list[list[str]]:
    """The first value of every sweep, then each sweep value once: enough to check every value."""
    fixed, sweeps = [], []
    for o in overrides:
        if _hydra_key(o):
            continue  # launcher and output settings: Hydra's own business
        key = o.get_key_element()  # with its +, ++ or ~
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


# Beyond these, a grid's jobs are checked only as each starts (a sweep that large is rare).
MOST_COMPOSED, MOST_JOBS = 16, 4096


def _check_every_job(stage: str, overrides: list, composed: dict[frozenset, Any]) -> None:
    """Every job of a grid sweep, not only each value once: `-m loss=kd,logit_mse
    loss.standardize=false,true` holds the one bad pair (logit_mse, true). The config is composed
    once per combination of the swept groups' choices, and each combination of the swept plain
    keys is set on a copy of it, which takes milliseconds, not Hydra's tenth of a second.
    `composed`: the configs composed already, by their set of overrides."""
    from omegaconf import OmegaConf

    from distillrun.config import validate

    missing, first = object(), next(iter(composed.values()))
    fixed, groups, keys = [], [], []  # keys: per swept key, its (override, typed value) pairs
    for o in overrides:
        values = sweep_values(o) if o.is_sweep_override() and not _hydra_key(o) else None
        if values is None:
            fixed += [] if o.is_sweep_override() else [o.input_line]
            continue
        key = o.get_key_element()
        now = OmegaConf.select(first, key, default=missing) if key == o.key_or_group else missing
        lines = [f"{key}={v}" for v in values]
        if now is missing or OmegaConf.is_config(now):  # a group, or a key a group adds
            groups.append(lines)
        else:
            typed = list(o.sweep_iterator())
            keys.append(list(zip(lines, typed, strict=True)))
    too_many = math.prod(map(len, groups)) > MOST_COMPOSED or math.prod(map(len, keys)) > MOST_JOBS
    if not keys or too_many:
        return
    for choice in itertools.product(*groups):
        lines = [*fixed, *choice, *(pairs[0][0] for pairs in keys)]
        base = composed.get(frozenset(lines)) or _compose(stage, lines)
        for job in itertools.product(*keys):
            cfg = OmegaConf.create(OmegaConf.to_container(base))
            for line, value in job:
                OmegaConf.update(cfg, line.split("=", 1)[0], value, merge=False)
            try:
                validate(stage, cfg)
            except UserError as e:
                named = [*choice, *(_as_typed(line, value) for line, value in job)]
                raise UserError(f"the sweep's job {' '.join(named)}: {e}") from e


def _as_typed(line: str, value: Any) -> str:
    """`loss.standardize=true` as the user types it (Hydra's sweep strings say True)."""
    key = line.split("=", 1)[0]
    return f"{key}={str(value).lower()}" if isinstance(value, bool) else line


def _keys_from_swept_groups(stage: str, args: list[str], overrides: list) -> list[str]:
    """`-m +experiment=a,b dataset.root=x`: force (`++`) a key that only the swept groups add.

    Hydra composes a sweep's base config without any swept value, so there `dataset.root`
    does not exist yet and Hydra refuses it. Every job's own config was composed and checked
    above with the key as typed, so forcing it here cannot let a misspelled key through.
    """
    if not any(o.is_sweep_override() for o in overrides):
        return args
    fixed = [o for o in overrides if not o.is_sweep_override() and not _hydra_key(o)]
    keys = [o for o in fixed if "." in o.key_or_group and o.get_key_element()[0] not in "+~"]
    if not keys:
        return args
    from omegaconf import OmegaConf

    base = _compose(stage, [o.input_line for o in fixed if o not in keys])
    missing = object()
    forced = {
        o.input_line
        for o in keys
        if OmegaConf.select(base, o.key_or_group, default=missing) is missing
    }
    return [f"++{a}" if a in forced else a for a in args]


def _compose(stage: str, overrides: list[str], with_hydra: bool = False) -> Any:
    """The stage's config with these overrides (and Hydra's own settings, `hydra.*`, if
    `with_hydra`); `key=value` for a key it does not have is a UserError with the closest key
    (Hydra's own advice, `+key=`, would add a key no one reads)."""
    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException

    from distillrun.config import unknown_key

    try:
        with initialize_config_module(config_module="distillrun.conf", version_base="1.3"):
            return compose(config_name(stage), overrides, return_hydra_config=with_hydra)
    except ConfigCompositionException as e:
        missing = re.match(r"Could not (?:override|delete from config)\b.*?'([^']+)'", str(e))
        if missing is None:
            raise
        key = missing.group(1)
        others = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != key]
        raise UserError(unknown_key(stage, key, _stage_keys(stage, others))) from e


def _stage_keys(stage: str, overrides: list[str]) -> list[str]:
    """The key paths of the stage's config (with these overrides, when they compose)."""
    from omegaconf import OmegaConf

    from distillrun.config import key_paths

    for attempt in (overrides, []):
        try:
            cfg = _compose(stage, attempt)
        except Exception:
            continue
        return key_paths(OmegaConf.to_container(cfg))
    return []


def _check_output_root(output_root: str) -> None:
    """Create the output root now, so an unwritable one is one line instead of Hydra's trace."""
    try:
        Path(output_root).mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=output_root, prefix=".write-test-")
        probe.close()
    except OSError as e:
        raise UserError(
            f"paths.output_root={output_root} cannot be written ({e.strerror or e}): "
            "choose a writable folder with paths.output_root=..."
        ) from e
    free_mb = shutil.disk_usage(output_root).free / 2**20
    if free_mb < MIN_FREE_MB:  # Hydra would fail writing .hydra/ with its own trace
        raise UserError(
            f"only {free_mb:.0f} MB free under paths.output_root={output_root}: free some disk "
            "space, or choose another folder with paths.output_root=..."
        )


# Hydra options followed by a value, which is not a folder for `report`.
_VALUE_OPTIONS = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp"}
_VALUE_OPTIONS |= {"--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}
_OPTIONAL_VALUES = {"job", "hydra", "all", "config", "defaults", "defaults-tree", "plugins"}


def folders_to_override(args: list[str]) -> list[str]:
    """`distillrun report A B` -> `runs=['A','B']`: Hydra takes no positional arguments."""
    folders, rest, after_option = [], [], None
    for a in args:
        takes_value = after_option in _VALUE_OPTIONS and (
            after_option not in ("--cfg", "-c", "--info", "-i") or a in _OPTIONAL_VALUES
        )
        if takes_value or "=" in a or a.startswith("-"):
            rest.append(a)
        else:
            folders.append(a)
        after_option = a
    if not folders:
        return args
    quoted = ",".join("'" + f.replace("\\", "\\\\").replace("'", "\\'") + "'" for f in folders)
    return [*rest, f"runs=[{quoted}]"]


def _check_run_dir(overrides: list, multirun: bool) -> None:
    """An unwritable hydra.run.dir (or hydra.sweep.dir) is one line, not Hydra's trace."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    for o in overrides:
        if o.key_or_group != key or o.is_sweep_override():
            continue
        value = str(o.value())
        folder = Path(value)
        if "${" in value:  # e.g. ${now:...}: check the folder before the first interpolation
            literal = value.split("${", 1)[0]
            folder = Path(literal) if literal.endswith("/") else Path(literal).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-").close()
        except OSError as e:
            raise UserError(
                f"{key}={value} cannot be written ({e.strerror or e}): choose a writable folder"
            ) from e
        if artifacts.is_locked(folder):  # before Hydra rewrites its .hydra/
            raise UserError(
                f"{key}={value} is in use by another distillrun process: wait for it to finish, "
                "or choose another folder"
            )


def _refuse_held_folders(stage: str, overrides: list, multirun: bool) -> None:
    """Never write a run into a folder that holds one (before Hydra writes its `.hydra/`
    there): a complete run is never overwritten, an unfinished one is continued with resume=.
    For a sweep: the folders its jobs would land in (a search continues in its own folder by
    design: its finished trials are kept and its cut-off ones resumed)."""
    given = {o.key_or_group: o for o in overrides if not o.is_sweep_override()}
    if not multirun:
        folder = _literal_folder(given.get("hydra.run.dir"))
        if folder is not None and os.environ.get(RESUME_ENV) != str(folder.resolve()):
            _refuse_held(stage, folder, "hydra.run.dir")
        return
    sweeper = given.get("hydra/sweeper")
    folder = _literal_folder(given.get("hydra.sweep.dir"))
    if folder is None or (sweeper and sweeper.value() != "basic") or "hydra.sweep.subdir" in given:
        return
    for job in range(_job_count(overrides)):
        _refuse_held(stage, folder / str(job), "hydra.sweep.dir")


def _literal_folder(override: Any) -> Path | None:
    """The folder an override names, None when it has none or an interpolation (${now:...}
    makes a fresh one)."""
    if override is None or "${" in str(override.value()):
        return None
    return Path(str(override.value())).expanduser()


def _job_count(overrides: list) -> int:
    """How many jobs a grid sweep launches (numbered 0, 1, ...): the product of the numbers
    of values (a glob() sweep, which Hydra expands itself, counted as one)."""
    count = 1
    for o in overrides:
        if o.is_sweep_override() and not _hydra_key(o):
            values = sweep_values(o)
            count *= len(values) if values else 1
    return count


def _refuse_held(stage: str, folder: Path, key: str) -> None:
    """Refuse `folder` if it holds a run; reads only (a refused folder is left as it was)."""
    held = artifacts.holds_run(folder)
    if held is None or artifacts.is_locked(folder):
        return  # no run; or one running now, which _check_run_dir refuses as in use
    what = held.get("stage", stage)
    if held.get("status") in ("complete", "pruned"):
        raise UserError(
            f"{key}={folder} holds a {held['status']} {what} run, which is never overwritten: "
            "choose a fresh folder"
        )
    raise UserError(
        f"{key}={folder} holds an unfinished {what} run: continue it with `distillrun {what} "
        f"resume={folder}`, or choose a fresh folder"
    )


# --- resume=<run folder> -------------------------------------------------------------------------


def resume_args(stage: str, args: list[str]) -> list[str]:
    """`resume=<folder>`: the run's own overrides plus its folder as hydra.run.dir.

    A complete run is said so (exit 0). Other overrides must be the run's own: a resumed run
    has to be the same run, or its numbers would be neither the old run's nor a new one's.
    """
    from omegaconf import OmegaConf

    given = [a for a in args if a.startswith("resume=")]
    others = preset_as_choice([a for a in args if not a.startswith("resume=")])
    if len(given) > 1:
        raise UserError("resume= given twice: name one run folder")
    value = given[0].split("=", 1)[1]
    try:
        folder = Path(os.path.expanduser(value)).resolve()
    except (RuntimeError, OSError) as e:  # a symbolic-link loop
        raise UserError(f"resume={value} cannot be resolved ({e}): name a run folder") from e
    flags = [a for a in others if a.startswith("-")]
    if flags:
        raise UserError(
            f"resume= continues one run with its own settings: drop {' '.join(flags)} "
            "(a sweep's jobs are resumed one by one: resume=<sweep folder>/<job number>)"
        )
    saved_path = folder / ".hydra" / "overrides.yaml"
    if not folder.is_dir() or not saved_path.is_file():
        what = "does not exist" if not folder.is_dir() else "is not a run folder (no .hydra/)"
        raise UserError(f"resume={folder} {what}: pass the folder of an interrupted {stage} run")
    try:
        saved = preset_as_choice([str(o) for o in OmegaConf.load(saved_path)])
        job = OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra.job.name
        manifest = _read_json(folder / "manifest.json")
    except Exception as e:
        raise UserError(f"resume={folder}: its .hydra/ or manifest.json is damaged ({e})") from e
    if job != stage:
        raise UserError(
            f"resume={folder} is a {job} run: resume it with `distillrun {job} resume={folder}`"
        )
    status = manifest.get("status") if isinstance(manifest, dict) else None
    if status == "complete":
        if distributed.is_main():
            print(f"distillrun {stage}: {folder} is already complete; nothing to resume")
        sys.exit(0)
    # (Under torchrun, process 0 may have locked it already: it checks for all of them.)
    if distributed.is_main() and artifacts.is_locked(folder):
        raise UserError(f"resume={folder} is still running: wait for it, or stop it first")
    why = artifacts.changed_inputs(manifest or {})
    if why:
        raise UserError(
            f"resume={folder}: {why}; it cannot be resumed on other inputs: start a new run"
        )
    changed = [a for a in others if a not in saved]
    if changed:
        raise UserError(
            f"resume={folder} must keep the run's own overrides ({' '.join(saved) or 'none'}); "
            f"drop {' '.join(changed)}, or start a new run to change them"
        )
    os.environ[RESUME_ENV] = str(folder)
    quoted = str(folder).replace("\\", "\\\\").replace("'", "\\'")
    return [*saved, f"hydra.run.dir='{quoted}'"]


def check_torchrun(stage: str, args: list[str]) -> None:
    """One training run per torchrun: the stages that do not train, and sweeps, are refused."""
    if stage not in training_stages():
        raise UserError(
            f"{stage} does not train: run it without torchrun (torchrun is for "
            f"{', '.join(training_stages())})"
        )
    if any(a in ("-m", "--multirun") for a in args):
        raise UserError(
            "a sweep (-m) under torchrun: torchrun trains one run; sweep without torchrun, or "
            "start each run under torchrun"
        )


def torchrun_args(stage: str, args: list[str]) -> list[str]:
    """Under torchrun: one training run, in process 0's run folder. The other processes get a
    private temporary folder for Hydra (removed at exit) and print nothing to stdout."""
    check_torchrun(stage, args)
    if distributed.is_main():
        return args
    private = tempfile.mkdtemp(prefix=f"distillrun-rank{distributed.rank()}-")
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    _quiet_stdout()
    kept = [a for a in args if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return [*kept, f"hydra.run.dir={private}", "hydra.output_subdir=null"]


def _read_json(path: Path) -> dict[str, Any] | None:
    import json

    return json.loads(path.read_text()) if path.is_file() else None


def shows_config_only(args: list[str]) -> bool:
    """--help, --hydra-help, --cfg, --info and shell completion: Hydra answers them from the
    config alone and never calls the stage's task."""
    parsed = parse_hydra_args(args)
    return bool(
        parsed.help or parsed.hydra_help or parsed.cfg or parsed.info or parsed.shell_completion
    )


def config_app(stage: str) -> Any:
    """The stage's Hydra app over the same config, without its task: for what only shows the
    config, so that the stage module (and torch with it) is not imported for a --help or a Tab.
    tests/test_config_app.py checks that it prints what the stage's own app prints."""
    import hydra

    def task(cfg: Any) -> None:
        raise RuntimeError(f"distillrun {stage}: the config-only app was asked to run the stage")

    return hydra.main(
        version_base="1.3", config_path="pkg://distillrun.conf", config_name=config_name(stage)
    )(task)


def quick_help(stage: str, args: list[str]) -> str | None:
    """`distillrun <stage> --help` as Hydra prints it, without Hydra's rendering, which builds a
    config repository for each of its hundred group listings (half of a 1 s help). None where
    Hydra must answer: the user's own configs, --resolve, or a template naming Hydra's flags or
    groups. tests/test_config_app.py checks that both print the same."""
    import string

    from omegaconf import OmegaConf, open_dict

    parsed = parse_hydra_args(args)
    if parsed.config_path or parsed.config_name or parsed.config_dir or parsed.resolve:
        return None
    try:
        cfg = _compose(stage, parsed.overrides, with_hydra=True)
    except Exception:  # a bad override: Hydra says what is wrong, as before
        return None
    template = cfg.hydra.help.template
    if "$FLAGS_HELP" in template or "$HYDRA_CONFIG_GROUPS" in template:
        return None
    with open_dict(cfg):
        del cfg["hydra"]
    groups = "".join(f"{g}: {', '.join(options)}\n" for g, options in config_groups())
    return string.Template(template).substitute(
        APP_CONFIG_GROUPS=groups, CONFIG=OmegaConf.to_yaml(cfg)
    )


def config_groups() -> list[tuple[str, list[str]]]:
    """Every group under conf/ (debug/specialists included) with its choices, sorted."""
    from importlib import resources

    from distillrun.config import group_choices

    found, folders = [], [(resources.files("distillrun.conf"), "")]
    while folders:
        folder, name = folders.pop()
        options = group_choices(name) if name else []
        if options:
            found.append((name, options))
        subfolders = [f for f in folder.iterdir() if f.is_dir() and f.name != "__pycache__"]
        folders += [(f, f"{name}/{f.name}".lstrip("/")) for f in subfolders]
    return sorted(found)


def call_stage(stage: str, args: list[str]) -> None:
    sys.argv = [sys.argv[0], *args]
    if parse_hydra_args(args).help:
        text = quick_help(stage, args)
        if text is not None:
            print(text)
            return
    if shows_config_only(args):
        config_app(stage)()
        return
    module = importlib.import_module(module_name(stage))
    module.main()
    from distillrun.runs import summary  # loaded by the sweep's callback, if a sweep ran

    if summary.last_sweep and summary.last_sweep[0]:
        failed, jobs, folder = summary.last_sweep
        fail(f"{failed} of {jobs} jobs did not complete: see {folder / 'summary.csv'}", stage)


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        try:
            print_help()
        except BrokenPipeError:  # `distillrun --help | head`: the reader left, not an error
            _quiet_stdout()
        return
    if argv[0] in ("-sc", "--shell-completion"):
        complete(argv)
        return
    if argv[0] == RUNS_COMMAND:
        from distillrun.runs.listing import runs_command

        _user_errors(RUNS_COMMAND, runs_command, argv[1:])
        return
    if argv[0] == TORCHRUN_COMMAND:
        sys.exit(launch_torchrun(argv[1:]))
    stage, args = argv[0], preset_as_choice(argv[1:])
    if stage not in STAGES:
        close = difflib.get_close_matches(stage, [*STAGES, RUNS_COMMAND, TORCHRUN_COMMAND], n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        fail(f"unknown stage '{stage}': {hint}stages are {', '.join(STAGES)}")
    if stage == "report":
        args = folders_to_override(args)
    # Hydra's parser takes -m only before or after all overrides: put it first, wherever it is.
    sweep_flags = [a for a in args if a in ("-m", "--multirun")]
    args = sweep_flags + [a for a in args if a not in ("-m", "--multirun")]
    # SIGTERM (`kill`, a scheduler) and SIGHUP (the terminal closed) stop the sweep like
    # Ctrl-C does, so that a parallel launcher shuts its worker processes down instead of
    # leaving them behind.
    stop_on_signals()
    from distillrun.console import output_may_close  # (rich: not for --help or completion)

    try:
        with output_may_close():  # `| head`, a closed terminal: the run goes on unheard
            if any(a.startswith("resume=") for a in args):
                args = _user_errors(stage, resume_args, stage, args)
            if distributed.launched():
                args = _user_errors(stage, torchrun_args, stage, args)
            register_sweeper()  # hydra/sweeper=optuna
            args = precheck(stage, args)
            call_stage(stage, args)
    except BrokenPipeError:  # `distillrun distill --help | head`: the reader left, not an error
        _quiet_stdout()
        sys.exit(1)
    except KeyboardInterrupt as e:  # outside a run (a started run says how to resume it)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if distributed.is_main():
            print(f"distillrun {stage}: interrupted", file=sys.stderr)
        sys.exit(interrupted_exit_code(e))


def launch_torchrun(argv: list[str]) -> int:
    """`distillrun torchrun [torchrun options] <stage> [overrides]`: the config checked here,
    before any process starts, then torchrun in process (integrations/torchrun.py)."""
    from distillrun.integrations import torchrun

    options, stage, args = _user_errors(TORCHRUN_COMMAND, torchrun.split, argv, list(STAGES))
    args = preset_as_choice(args)
    _user_errors(stage, check_torchrun, stage, args)
    checked = args
    if any(a.startswith("resume=") for a in args):  # the processes resume it themselves
        checked = _user_errors(stage, resume_args, stage, args)
    register_sweeper()
    precheck(stage, checked)
    return torchrun.launch(options, stage, args)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _user_errors(stage: str, step: Any, *args: Any) -> Any:
    try:
        return step(*args)
    except UserError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(str(e), stage)


if __name__ == "__main__":
    main()
