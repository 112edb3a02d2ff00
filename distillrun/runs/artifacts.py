"""Run folders, the contract between stages.

A run folder holds Hydra's `.hydra/`, `metrics.jsonl`, checkpoints and `manifest.json`. Every
file appears atomically (written under a temporary name, then renamed), and the manifest is
written last: a folder whose manifest does not say "complete" is unfinished and never consumed.

A run is known by its `run_id` (written when it starts, kept on resume, copied with the folder)
and by the sha256 of its files (`content`, recorded when it completes), never by its path: a
consumer records both of every input run, and every cache derived from a run is keyed by them.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from distillrun.errors import UserError
from distillrun.stages import stages_for

MANIFEST = "manifest.json"
# `<file>.absent` holds why a stage did not write `<file>` (e.g. an imported ONNX teacher has no
# PyTorch checkpoint), so a consumer that needs the file fails with that reason.
ABSENT = ".absent"
LOCK = ".lock"  # held by the process running (or resuming) the run in this folder
LIBRARIES = (
    "torch",
    "torchvision",
    "numpy",
    "hydra-core",
    "omegaconf",
    "scikit-learn",
    "rich",
    "matplotlib",
)


_UMASK = os.umask(0)
os.umask(_UMASK)


def now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="microseconds")


def pyplot() -> Any:
    """matplotlib's pyplot for writing figures to files: the Agg backend (never a window), and
    its INFO chatter ("generated new fontManager" on a first plot) kept off the console."""
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 100, tight: bool = True) -> None:
    """Write `fig` as a PNG, atomically, and free it."""
    bbox = "tight" if tight else None
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches=bbox), "wb")
    pyplot().close(fig)


def atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    """Write through `write(file)` under a temporary name, then rename: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), "w")


def write_bytes(path: Path, data: bytes) -> None:
    """A file of raw bytes (a PNG plot), written atomically like everything else."""
    atomic_write(path, lambda f: f.write(data), "wb")


def save_tensors(path: Path, obj: Any) -> None:
    """torch.save of tensors and plain containers only, so `load_tensors` can read it safely."""
    import torch  # here, so that sweep summaries and reports do not pay for importing torch

    atomic_write(path, lambda f: torch.save(obj, f), "wb")


def load_tensors(path: str | Path, map_location: Any = "cpu") -> Any:
    """Load a checkpoint or cache without executing anything it contains (weights_only).

    Every way a file can be bad (missing, empty, truncated, random bytes, a pickle that asks
    for code or objects other than tensors) is one UserError naming the file and the fix.
    """
    import torch  # here, so that sweep summaries and reports do not pay for importing torch

    path = Path(path)
    if not path.is_file():
        absent = path.with_name(path.name + ABSENT)
        if absent.is_file():  # left out on purpose, and the stage said why
            raise UserError(f"no {path.name} in {path.parent}: {absent.read_text().strip()}")
        raise UserError(f"missing file {path}: the run folder is incomplete; re-run its stage")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols: not for users
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(
            f"cannot load {path}: {why_unloadable(e)}; nothing in it was run. The file is "
            "damaged or not a distillrun checkpoint: re-run the stage that wrote it"
        ) from e


def why_unloadable(e: Exception) -> str:
    text = str(e)
    if isinstance(e, EOFError) or "central directory" in text or "failed reading" in text:
        return "it is empty or truncated"
    if "Unsupported global" in text:
        return "it asks to build objects other than tensors (code), which was refused"
    if not isinstance(e, OSError):  # the unpickler choked: UnpicklingError, IndexError, ...
        return "it is not a tensor checkpoint (unreadable or disallowed pickle data)"
    first = text.strip().splitlines()[0][:120] if text.strip() else type(e).__name__
    return f"unreadable ({first})"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records)), "w")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def code_version() -> str:
    """The package version, plus the git commit when running from a clone."""
    from distillrun import __version__

    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def environment() -> dict[str, Any]:
    """Where and how the run ran: what it takes to repeat it, besides config and seed."""
    import torch

    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_manifest(run_dir: Path, **fields: Any) -> dict[str, Any]:
    manifest = {"run_dir": str(run_dir.resolve()), **fields}
    write_json(run_dir / MANIFEST, manifest)
    return manifest


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The run's manifest, or None when the run is unfinished (no manifest yet)."""
    path = run_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"corrupt manifest {path} ({e}): re-run the stage that wrote it") from e
    if not isinstance(manifest, dict):
        raise UserError(f"corrupt manifest {path}: not a JSON object; re-run its stage")
    return manifest


def lock_run_folder(folder: Path) -> IO[str]:
    """An exclusive lock on a run folder, held while the returned file stays open. The OS
    releases it when the process dies, so a killed run can be resumed, but never by two
    processes at once."""
    f = open(folder / LOCK, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(
            f"{folder} is in use by another distillrun process: wait for it to finish, or stop "
            "it first"
        ) from None
    return f


def is_locked(folder: Path) -> bool:
    """Whether another process holds the run folder's lock (without creating anything)."""
    if not (folder / LOCK).is_file():
        return False
    try:
        lock_run_folder(folder).close()
    except UserError:
        return True
    return False


def reported_status(folder: Path, manifest: dict[str, Any]) -> str:
    """A run's status as it is reported: a manifest saying "running" whose folder lock no
    process holds was left by a process that died (kill -9, power loss, out of memory), so
    that run reads "interrupted" (resume it) rather than "running" forever."""
    said = str(manifest.get("status", "?"))
    if said != "running":
        return said
    try:
        return "running" if is_locked(folder) else "interrupted"
    except OSError:  # a folder we may not lock (read-only): take the manifest's word
        return said


def is_complete(manifest: dict[str, Any] | None, stage: str) -> bool:
    return (
        bool(manifest)
        and manifest.get("status") == "complete"
        and manifest.get("stage") in stages_for(stage)
    )


def is_sweep(folder: Path) -> bool:
    """A Hydra multirun folder: no manifest of its own, its jobs in subfolders."""
    return (folder / "multirun.yaml").is_file() and not (folder / MANIFEST).exists()


def sweep_jobs(folder: Path) -> list[Path]:
    jobs = [p for p in folder.iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    return sorted(jobs, key=lambda p: (len(p.name), p.name))  # 0, 1, ..., 10


def run_folders(output_root: Path, stage: str) -> list[Path]:
    """Every run folder of a stage (and of the stages that stand in for it): single runs and
    the jobs of its sweeps."""
    found = []
    for name in stages_for(stage):
        base = output_root / name
        if base.is_dir():
            found += [p for p in base.iterdir() if p.is_dir() and p.name != "multirun"]
            found += [p for p in base.glob("multirun/*/*") if p.is_dir()]
    return found


def newest_complete_run(
    output_root: Path,
    stage: str,
    accept: Callable[[dict[str, Any]], str | None],
    say: Callable[[str], None],
) -> tuple[Path, dict[str, Any]]:
    """The newest complete run of `stage` that `accept` takes (it returns None or why not)."""
    candidates, skipped, refused = [], [], []
    for folder in run_folders(output_root, stage):
        try:
            manifest = read_manifest(folder)
        except UserError:
            manifest = None
        if not is_complete(manifest, stage):
            skipped.append(reported_status(folder, manifest) if manifest else "unfinished")
            continue
        why_not = accept(manifest)
        if why_not:
            refused.append(why_not)
            continue
        candidates.append((manifest.get("started", ""), folder, manifest))
    if skipped:
        counts = ", ".join(f"{skipped.count(s)} {s}" for s in sorted(set(skipped)))
        say(
            f"skipped {len(skipped)} unfinished or failed {stage} run(s) ({counts}) under "
            f"{output_root / stage} (continue one with `distillrun {stage} resume=<run folder>`)"
        )
    if not candidates:
        detail = f" ({refused[0]})" if refused else ""
        raise UserError(
            f"no complete {stage} run under {output_root / stage}{detail}: "
            f"run `distillrun {stage}` first, or pass the run folder explicitly"
        )
    _, folder, manifest = max(candidates, key=lambda c: c[0])
    return folder, manifest


def _a(word: str) -> str:
    """`word` with its indefinite article: "an export", "a distill"."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def complete_run(folder: Path, stage: str) -> dict[str, Any]:
    """The manifest of an explicitly named run folder, which must be a complete `stage` run."""
    if not folder.is_dir():
        what = "does not exist"
        if folder.is_symlink():
            what = "is a symbolic link to nothing (or a link loop)"
        elif folder.exists():
            what = "is a file, not a run folder"
        raise UserError(f"run folder {folder} {what}: pass the path of a {stage} run")
    manifest = read_manifest(folder)
    resume = f"`distillrun {stage} resume={folder}`"
    if manifest is not None and not manifest.get("stage"):
        raise UserError(
            f"corrupt manifest {folder / MANIFEST}: it names no stage; re-run the stage that "
            "wrote it, or pass another run"
        )
    if manifest is None:
        raise UserError(
            f"{folder} is not a finished run (no {MANIFEST}): it was interrupted or is still "
            f"running; finish it with {resume} or pass another {stage} run"
        )
    if manifest.get("stage") not in stages_for(stage):
        raise UserError(
            f"{folder} is {_a(manifest['stage'])} run, not {_a(stage)} run: "
            f"pass the folder of a {stage} run"
        )
    state = reported_status(folder, manifest)
    if state == "running":
        raise UserError(
            f"{folder} is a {stage} run still running (another process holds it): wait for it "
            "to finish, or pass another run"
        )
    if state != "complete":
        why = "interrupted: it was stopped or killed" if state == "interrupted" else state
        raise UserError(
            f"{folder} is an unfinished {stage} run (status {why}): finish it with {resume}, "
            "or pass another run"
        )
    return manifest


# --- run identity: what consumers record of their inputs, and what keys derived caches ------------

# Not content: the manifest itself, and the log of epochs (a resumed run rewrites it).
NOT_CONTENT = {MANIFEST, "metrics.jsonl"}


def new_run_id() -> str:
    return str(uuid.uuid4())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hashes(run_dir: Path) -> dict[str, str]:
    """The sha256 of every file a run wrote at its top level (checkpoints, logits.pt, exports,
    plots), recorded in its manifest as `content` when it completes. Folders (`.hydra/`, a
    teachers run's `view-cache/`) and hidden files are not the run's content."""
    return {
        p.name: file_sha256(p)
        for p in sorted(run_dir.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name not in NOT_CONTENT
    }


def run_identity(folder: Path, manifest: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """What a consumer records of a complete input run, and what keys the caches it derives:
    the run's id and the sha256 of the files `names` it reads, hashed now (so what is checked
    is what is there, not what the manifest claims).

    A file whose hash differs from the one the run recorded when it completed was replaced or
    edited since, and is refused. Runs made before distillrun recorded ids and hashes have
    neither: their files are hashed now, unchecked, and their id is None (their caches are
    then keyed by content alone).
    """
    recorded = manifest.get("content")
    content = {}
    for name in names:
        path = folder / name
        if not path.is_file():
            raise UserError(f"missing file {path}: the run folder is incomplete; re-run its stage")
        digest = file_sha256(path)
        if isinstance(recorded, dict) and recorded.get(name) != digest:
            raise UserError(
                f"{path} is not the file its run wrote (its sha256 differs from the one in "
                f"{folder / MANIFEST}): it was replaced or edited since; restore it, or run "
                f"{manifest.get('stage')} again into a fresh folder"
            )
        content[name] = digest
    return {"path": str(folder), "run_id": manifest.get("run_id"), "content": content}


def cache_identity(identities: list[dict[str, Any]], prefix: str = "") -> list[Any]:
    """The part of input runs' identities a cache key holds: ids and hashes of the files whose
    names start with `prefix`, never paths (a moved or copied run keeps its caches)."""
    return [
        [i.get("run_id"), {k: v for k, v in i["content"].items() if k.startswith(prefix)}]
        for i in identities
    ]


def changed_run(recorded: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Why the run now at a recorded input's path is not the run that was consumed (None: the
    same run, its files unchanged)."""
    if recorded.get("run_id") and recorded.get("run_id") != now.get("run_id"):
        return (
            f"{recorded['path']} now holds another run (run id {now.get('run_id')}, not "
            f"{recorded['run_id']})"
        )
    changed = [k for k, v in recorded.get("content", {}).items() if now["content"].get(k) != v]
    if changed:
        return f"{Path(recorded['path']) / changed[0]} changed since"
    return None


def changed_inputs(manifest: dict[str, Any]) -> str | None:
    """Why a run's recorded input runs are no longer what is at their paths (None: unchanged).
    For a resume: a run continued on other inputs would be neither the old run nor a new one."""
    for key, runs in (manifest.get("input_runs") or {}).items():
        for recorded in runs:
            folder = Path(recorded["path"])
            try:
                current = read_manifest(folder) if folder.is_dir() else None
                if not current or current.get("status") != "complete":
                    return f"its {key} run {folder} is gone or unfinished"
                why = changed_run(recorded, run_identity(folder, current, recorded["content"]))
            except UserError as e:
                why = str(e)
            if why:
                return f"its {key} input {why}"
    return None


def holds_run(folder: Path) -> dict[str, Any] | None:
    """The manifest of the run a folder holds ({} for one that started but wrote none yet, or
    whose manifest is unreadable), or None when it holds no run."""
    if (folder / MANIFEST).is_file():
        try:
            return read_manifest(folder) or {}
        except UserError:
            return {}
    return {} if (folder / ".hydra").is_dir() else None
