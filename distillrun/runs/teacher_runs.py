"""Where a student's teachers come from, and their cached outputs.

A teachers source is one train-teachers run, a sweep folder of train-teachers jobs (e.g.
`train-teachers -m seed=0,1,2,3,4`, one member per job, any launcher), or a list of such
folders: every member of every run joins one ensemble. An evaluate run (a generalist plus its
specialists) is a teacher too, and an import-teachers run (teachers trained elsewhere) counts as
a train-teachers run everywhere (its record in distillrun.stages.STAGES).

The teachers' logits on the train/val/test splits are computed once, by train-teachers, and
saved with each run (logits.pt). A source of several runs stacks them once into
`teacher_logits.pt` beside them (in the sweep folder, or under the output root for a list),
under a file lock, so the parallel jobs of a distill sweep build it once and share it. It is
keyed by the runs' ids and the sha256 of their logits.pt (`Teachers.identities`), never by their
folders: a copied or moved source keeps it, and a folder that now holds other teachers does not.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from distillrun.core.data import Data
from distillrun.errors import UserError
from distillrun.method.ensemble import combine
from distillrun.runs import artifacts
from distillrun.stages import stages_for

STAGE = "train-teachers"
COMBINATION = "evaluate"
CACHE = "teacher_logits.pt"
SPLITS = ("train", "val", "test")


@dataclass
class Teachers:
    """The runs of one ensemble: their folders (resolved), manifests, and where to cache."""

    source: str  # what to print and record: a run folder, a sweep folder, or a list
    runs: list[Path]
    manifests: list[dict[str, Any]]
    folder: Path | None  # the one run or sweep folder named (its caches go in it); None: a list
    output_root: Path  # a list's caches go in output_root/teacher-cache/<key>

    @property
    def members(self) -> list[dict[str, Any]]:
        return [m for manifest in self.manifests for m in manifest["metrics"].get("members", [])]

    @property
    def params(self) -> int | None:
        counts = [m["metrics"].get("teacher_params") for m in self.manifests]
        return None if None in counts else sum(counts)

    @property
    def member_files(self) -> list[Path]:
        """Every member's checkpoint, or [] when any run lacks them (e.g. deleted to save
        space: distill needs only the logits)."""
        files = []
        for run, manifest in zip(self.runs, self.manifests, strict=True):
            count = len(manifest["metrics"].get("members", []))
            found = [run / f"member_{i}.pt" for i in range(count)]
            if not count or not all(f.is_file() for f in found):
                return []
            files += found
        return files

    @cached_property
    def identities(self) -> list[dict[str, Any]]:
        """Each run's id and the sha256 of what distill reads of it, checked against its
        manifest (artifacts.run_identity): recorded as distill's input, and the key of every
        cache derived from these teachers."""
        return [
            artifacts.run_identity(run, manifest, _files_read(run, manifest))
            for run, manifest in zip(self.runs, self.manifests, strict=True)
        ]

    @property
    def cache_dir(self) -> Path:
        """Where the caches of these teachers live: in the run or sweep folder named, or for a
        list of runs in a folder named by their identities (not their paths)."""
        if self.folder is not None:
            return self.folder
        key = json.dumps(artifacts.cache_identity(self.identities, "logits"), sort_keys=True)
        return self.output_root / "teacher-cache" / hashlib.sha256(key.encode()).hexdigest()[:16]

    @property
    def combination(self) -> dict[str, Any] | None:
        """The metrics of an evaluate run (a generalist plus specialists), else None."""
        first = self.manifests[0]
        return first["metrics"] if first.get("stage") == COMBINATION else None

    @property
    def dataset(self) -> dict[str, Any]:
        return self.manifests[0].get("dataset", {})


@dataclass
class ChosenTeachers:
    """The teachers a stage consumes, once found (stages.common.resolve_teachers): what its
    manifest records of them, their logits, and what its first line says of them."""

    source: str  # a run folder, a sweep folder or a list, as recorded
    identities: list[dict[str, Any]]  # each run read (artifacts.run_identity)
    logits: dict[str, torch.Tensor]  # every member's logits [M, N, C] on each split
    logits_file: Path | None  # where they came from (None: stacked in memory)
    built: bool = False  # this run wrote `logits_file` (a stacked cache)
    members: list[int] | None = None  # the members that teach (None: every one)
    ensemble: str = "arithmetic"  # how they combine
    teachers: Teachers | None = None  # distill's: the runs themselves

    def summary(self, data: Data) -> str:
        """'2 members; logits from <file>; arithmetic ensemble: val error 3.1%, test error
        4.2%' (or 'member 0 of 3; ...' for one member of a run); the error rates from the
        logits on this data's splits."""
        count = self.logits["test"].shape[0]
        members = list(range(count)) if self.members is None else self.members
        which = f"{count} member{'s' * (count > 1)}"
        if self.members is not None:
            which = f"member{'s' * (len(members) > 1)} {', '.join(map(str, members))} of {count}"
        rates = []
        for split in ("val", "test"):
            rate = error_rate(
                self.logits[split][members], getattr(data, f"y_{split}"), self.ensemble
            )
            rates.append(f"{split} error {'n/a' if rate is None else f'{100 * rate:.1f}%'}")
        origin = "stacked their logits into" if self.built else "logits from"
        combined = f"{self.ensemble} ensemble: " if len(members) > 1 else ""
        return f"{which}; {origin} {self.logits_file or 'memory'}; {combined}{', '.join(rates)}"


def error_rate(logits: torch.Tensor, y: torch.Tensor, ensemble: str) -> float | None:
    """The share of the examples `y` that the ensemble of `logits` [M, N, C] gets wrong (None
    when there are none)."""
    if not len(y):
        return None
    wrong = combine(logits, ensemble).argmax(dim=1) != y.to(logits.device)
    return float(wrong.float().mean())


def choose_teachers(
    named: Any, output_root: Path, data: Data, ensemble: str, say: Callable[[str], None]
) -> ChosenTeachers:
    """distill's teachers: `named` (see find_teachers) with every member's logits."""
    teachers = find_teachers(named, output_root, data, say)
    logits, path, built = teacher_logits(teachers, data)
    return ChosenTeachers(
        teachers.source, teachers.identities, logits, path, built, None, ensemble, teachers
    )


def choose_member(
    folder: Path, manifest: dict[str, Any], data: Data, member: int, read: list[str]
) -> ChosenTeachers:
    """One member of a teachers run as the teacher (a generalist): its run's logits.pt checked
    against this data, and the run's identity over the files `read`."""
    logits = load_run_logits(folder, data)
    identity = artifacts.run_identity(folder, manifest, read)
    return ChosenTeachers(str(folder), [identity], logits, folder / "logits.pt", members=[member])


def _files_read(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """What distill reads of a teachers run: logits.pt, and the member checkpoints it has (the
    view cache and online teachers run them)."""
    count = len(manifest["metrics"].get("members", []))
    members = [f"member_{i}.pt" for i in range(count)]
    return ["logits.pt", *(name for name in members if (folder / name).is_file())]


def parse_source(source: str | None) -> Any:
    """A recorded `Teachers.source` back into a `teachers=` value (None stays None)."""
    if source and source.startswith("[") and source.endswith("]"):
        return [part.strip() for part in source[1:-1].split(",")]
    return source


def check_data(manifest: dict[str, Any], data: Data) -> str | None:
    """None when a run's manifest was made on these data and splits, else why not."""
    theirs = manifest.get("dataset", {})
    if theirs.get("fingerprint") == data.fingerprint:
        return None
    kept = (theirs.get("config") or {}).get("max_per_split")
    subset = f"; it kept {kept} of each split: dataset.max_per_split={kept}, as debug=tiny sets"
    return (
        f"{manifest.get('run_dir')} was trained on dataset={theirs.get('name')} with other "
        f"data or splits than this run's dataset={data.name} (the dataset fingerprint differs"
        f"{subset if kept else ''})"
    )


def _complete_sweep(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    jobs = artifacts.sweep_jobs(folder)
    if not jobs:
        raise UserError(f"sweep folder {folder} holds no jobs: pass a sweep that ran")
    found = []
    unfinished = []
    for job in jobs:
        manifest = artifacts.read_manifest(job)
        if not artifacts.is_complete(manifest, STAGE):
            unfinished.append(job.name)
            continue
        found.append((job, manifest))
    if unfinished:
        raise UserError(
            f"sweep {folder} has {len(unfinished)} of {len(jobs)} jobs that are not complete "
            f"train-teachers runs (jobs {', '.join(unfinished)}): finish them, or pass the "
            "complete ones as teachers=[run,run,...]"
        )
    return found


def _runs_of(folder: Path, data: Data) -> list[tuple[Path, dict[str, Any]]]:
    """The complete runs a named folder stands for: itself, or every job of a sweep."""
    if artifacts.is_sweep(folder):
        found = _complete_sweep(folder)
    else:
        # An evaluate run holds the generalist-plus-specialists distribution as logits.pt (one
        # member), so it can be distilled like any teachers run.
        manifest = artifacts.read_manifest(folder) if folder.is_dir() else None
        stage = COMBINATION if (manifest or {}).get("stage") == COMBINATION else STAGE
        found = [(folder, artifacts.complete_run(folder, stage))]
    for _, manifest in found:
        why_not = check_data(manifest, data)
        if why_not:
            raise UserError(
                f"{why_not}: pass the dataset settings the teachers used, or teachers trained "
                "on this dataset"
            )
    return found


def find_teachers(
    teachers: Any, output_root: Path, data: Data, say: Callable[[str], None]
) -> Teachers:
    """`teachers=` (a folder or a list of folders), or by default the newest complete run or
    sweep of train-teachers on the same data."""
    if teachers is None:
        folder = _newest_source(output_root, data, say)
        names = [folder]
    else:
        names = [Path(str(t)) for t in ([teachers] if isinstance(teachers, str) else teachers)]
        if not names:
            raise UserError("teachers=[] names no runs: pass a run or sweep folder, or leave it")
    found = [run for name in names for run in _runs_of(name, data)]
    runs = [folder.resolve() for folder, _ in found]
    if len(set(runs)) != len(runs):
        raise UserError("teachers= names the same run twice: list each run once")
    if len(names) == 1:
        source, folder = str(names[0].resolve()), names[0].resolve()
    else:
        source, folder = "[" + ", ".join(str(n.resolve()) for n in names) + "]", None
    return Teachers(source, runs, [m for _, m in found], folder, output_root.resolve())


def _newest_source(output_root: Path, data: Data, say: Callable[[str], None]) -> Path:
    """The newest complete train-teachers run or whole sweep on this data."""
    base = output_root / STAGE
    sweeps = sorted(s for name in stages_for(STAGE) for s in _sweeps(output_root / name))
    candidates, skipped = [], 0
    for folder in artifacts.run_folders(output_root, STAGE):
        if folder.parent.parent.name == "multirun":
            continue  # a sweep's jobs are considered together, below
        try:
            manifest = artifacts.read_manifest(folder)
        except UserError:
            manifest = None
        if not artifacts.is_complete(manifest, STAGE):
            skipped += 1
        elif check_data(manifest, data) is None:
            candidates.append((manifest.get("started", ""), folder))
    for sweep in sweeps:
        try:
            found = _complete_sweep(sweep) if artifacts.is_sweep(sweep) else []
        except UserError:
            found = []
        if not found:
            skipped += 1
        elif all(check_data(m, data) is None for _, m in found):
            candidates.append((max(m.get("started", "") for _, m in found), sweep))
    if skipped:
        say(
            f"skipped {skipped} unfinished or failed {STAGE} run(s) or sweep(s) under {base} "
            f"(continue one with `distillrun {STAGE} resume=<run folder>`)"
        )
    if not candidates:
        raise UserError(
            f"no complete {STAGE} run on dataset={data.name} under {base}: run "
            f"`distillrun {STAGE}` first, or pass teachers=<run or sweep folder>"
        )
    return max(candidates)[1]


def _sweeps(base: Path) -> list[Path]:
    return sorted(base.glob("multirun/*")) if base.is_dir() else []


def _holds_logits(cache: Any, data: Data) -> bool:
    """Logits [M, N, C] of this dataset's splits, tagged with its fingerprint."""
    ok = isinstance(cache, dict) and cache.get("fingerprint") == data.fingerprint
    for split in SPLITS:
        t = cache.get(split) if ok else None
        ok = ok and isinstance(t, torch.Tensor) and t.dim() == 3
        ok = ok and t.shape[1:] == (len(getattr(data, f"y_{split}")), data.num_classes)
    return ok


def load_run_logits(folder: Path, data: Data) -> dict[str, torch.Tensor]:
    """One run's logits.pt, checked against this dataset's splits (a UserError if not). The
    caller checks it is the file the run wrote (artifacts.run_identity)."""
    cache = artifacts.load_tensors(folder / "logits.pt")
    if not _holds_logits(cache, data):
        raise UserError(
            f"{folder / 'logits.pt'} does not hold teacher logits for this dataset's splits: "
            "the teachers run is damaged; re-run `distillrun train-teachers`"
        )
    return cache


def _read_cache(path: Path) -> dict[str, Any]:
    """The stacked cache, or {} when it is missing or damaged (then it is rebuilt)."""
    try:
        cache = artifacts.load_tensors(path) if path.is_file() else {}
    except UserError:
        return {}
    return cache if isinstance(cache, dict) else {}


def teacher_logits(
    teachers: Teachers, data: Data
) -> tuple[dict[str, torch.Tensor], Path | None, bool]:
    """Every member's logits [M, N, C] per split, the file they came from (None: stacked in
    memory, the cache folder being read-only), and whether this call wrote that file (True
    once per source, however many jobs ask at the same time). Each run's logits.pt is checked
    against the hash its run recorded (`teachers.identities`), whether it is read or cached."""
    if len(teachers.runs) == 1:
        path = teachers.runs[0] / "logits.pt"
        logits = load_run_logits(teachers.runs[0], data)  # first: a damaged file says so
        teachers.identities  # noqa: B018 - refuses a logits.pt its run did not write
        return logits, path, False
    path = teachers.cache_dir / CACHE
    identity = artifacts.cache_identity(teachers.identities, "logits")
    key = json.dumps([data.fingerprint, identity], sort_keys=True)
    try:
        teachers.cache_dir.mkdir(parents=True, exist_ok=True)
        lock = open(teachers.cache_dir / f".{CACHE}.lock", "a")
    except OSError:
        lock = None  # a read-only teachers folder: stack in memory, cache nothing
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the other jobs wait here while one builds it
            cache = _read_cache(path)
            if cache.get("key") == key and _holds_logits(cache, data):
                return cache, path, False
        parts = [load_run_logits(run, data) for run in teachers.runs]
        cache = {
            "fingerprint": data.fingerprint,
            "key": key,
            **{s: torch.cat([p[s] for p in parts]) for s in SPLITS},
        }
        if lock is None:
            return cache, None, False
        artifacts.save_tensors(path, cache)
        return cache, path, True
    finally:
        if lock is not None:
            lock.close()  # releases the lock
