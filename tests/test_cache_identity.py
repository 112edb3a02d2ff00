"""Caches are keyed by what they were computed from (run ids, content hashes), never by a path,
and a complete run folder is never overwritten (issue 24, item 1).

The bug these guard against: a teachers folder retrained in place (or deleted and retrained)
kept its view cache and its stacked-logits cache keyed by the folder's path, and distill
silently trained students on teachers that no longer existed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ONE_THREAD, assert_one_line_error, distillrun_here, manifest

from distillrun.config import RESUME_ENV
from distillrun.errors import UserError
from distillrun.runs import artifacts
from distillrun.stages import common
from distillrun.stages.common import Run

TEACHERS = ["train-teachers", "debug=tiny", "teachers.n=1"]
VIEWS = ["augment=shift", "augment.pixels=1"]
STUDENT = ["distill", "debug=tiny", "baseline=false", "model.hidden=[16]"]


def run(cwd: Path, *args: str, check: int | None = 0):
    """The command, in this process (no kill or signal here needs a process of its own)."""
    return distillrun_here(cwd, *args, env=ONE_THREAD, check=check)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under a folder, with its bytes and modification time (to the nanosecond)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two complete teachers runs of different seeds, to copy into each test's folders."""
    root = tmp_path_factory.mktemp("teachers")
    run(root, *TEACHERS, "seed=0", "hydra.run.dir=seed0")
    run(root, *TEACHERS, "seed=5", "hydra.run.dir=seed5")
    return {"seed0": root / "seed0", "seed5": root / "seed5"}


# --- in-process: what a run records, and what a consumer checks -----------------------------------


@pytest.mark.slow
def test_a_run_records_its_id_when_it_starts_and_its_content_when_it_completes(
    trained: dict[str, Path],
) -> None:
    m = manifest(trained["seed0"])
    assert m["run_id"] and m["run_id"] != manifest(trained["seed5"])["run_id"]
    assert set(m["content"]) == {"logits.pt", "member_0.pt"}
    folder = trained["seed0"]
    assert m["content"]["logits.pt"] == artifacts.file_sha256(folder / "logits.pt")


def complete_run(folder: Path, logits: bytes) -> dict:
    """A complete run folder holding one file, its id and hashes recorded as a stage does."""
    folder.mkdir()
    (folder / "logits.pt").write_bytes(logits)
    return artifacts.write_manifest(
        folder,
        stage="train-teachers",
        status="complete",
        run_id=artifacts.new_run_id(),
        content=artifacts.content_hashes(folder),
    )


def test_an_edited_file_is_refused_and_a_run_from_before_hashes_is_hashed_now(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "run"
    m = complete_run(folder, b"the teachers' logits")
    same = artifacts.run_identity(folder, m, ["logits.pt"])
    assert same == {"path": str(folder), "run_id": m["run_id"], "content": m["content"]}
    (folder / "logits.pt").write_bytes(b"other teachers' logits")
    with pytest.raises(UserError, match="logits.pt is not the file its run wrote"):
        artifacts.run_identity(folder, m, ["logits.pt"])
    # A run made before run ids and hashes: consumable, its files hashed now.
    legacy = {k: v for k, v in m.items() if k not in ("run_id", "content")}
    identity = artifacts.run_identity(folder, legacy, ["logits.pt"])
    assert identity["run_id"] is None
    assert identity["content"]["logits.pt"] == artifacts.file_sha256(folder / "logits.pt")


def test_a_resumed_run_refuses_inputs_that_are_other_runs_now(tmp_path: Path) -> None:
    """What the stage itself checks (a search resumes its trials without the dispatcher)."""
    a = artifacts.run_identity(tmp_path / "a", complete_run(tmp_path / "a", b"a"), ["logits.pt"])
    b = artifacts.run_identity(tmp_path / "b", complete_run(tmp_path / "b", b"a"), ["logits.pt"])
    resumed = Run("distill", tmp_path, torch.device("cpu"), resuming=True)
    resumed.info["input_runs"] = {"teachers": [a]}
    resumed.add_input("teachers", tmp_path / "a", [a])  # the same run: fine
    with pytest.raises(UserError, match="cannot resume .* on other teachers .*another run"):
        resumed.add_input("teachers", tmp_path / "a", [{**b, "path": a["path"]}])
    fresh = Run("distill", tmp_path, torch.device("cpu"))
    fresh.add_input("teachers", tmp_path / "b", [b])
    assert fresh.info["input_runs"] == {"teachers": [b]}


def test_a_stage_refuses_a_complete_run_folder_the_dispatcher_did_not_see(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backstop in run_stage, for folders a launcher chooses (a sweep's own subdir)."""
    done = tmp_path / "done"
    complete_run(done, b"x")
    with pytest.raises(UserError, match="holds a complete train-teachers run.*fresh folder"):
        common.refuse_complete_run(done)
    monkeypatch.setenv(RESUME_ENV, str(done.resolve()))
    common.refuse_complete_run(done)  # resuming it: the dispatcher said it is complete


# --- through the command --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_retrained_teachers_folder_is_refused_and_its_old_caches_are_never_read(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    """The issue's sequence: teachers in X, a view cache built, a retrain into X."""
    teachers = tmp_path / "X"
    shutil.copytree(trained["seed0"], teachers)  # as `train-teachers seed=0 hydra.run.dir=X`
    first = run(tmp_path, *STUDENT, *VIEWS, "teachers=X")
    assert "caching 9 views" in first.stdout
    before = snapshot(teachers)

    again = run(tmp_path, *TEACHERS, "seed=5", "hydra.run.dir=X", check=None)
    assert_one_line_error(again, "hydra.run.dir=X holds a complete train-teachers run", "fresh")
    assert snapshot(teachers) == before  # .hydra/ included: refused before Hydra wrote it

    # Deleted and retrained, with the old view cache put back where it was: never read.
    old_cache = tmp_path / "old-view-cache"
    shutil.move(teachers / "view-cache", old_cache)
    shutil.rmtree(teachers)
    run(tmp_path, *TEACHERS, "seed=5", "hydra.run.dir=X")
    shutil.copytree(old_cache, teachers / "view-cache")
    rebuilt = run(tmp_path, *STUDENT, *VIEWS, "teachers=X")
    assert "caching 9 views" in rebuilt.stdout and "view cache:" not in rebuilt.stdout
    assert len(list((teachers / "view-cache").glob("*.pt"))) == 2  # the old one, and the new


@pytest.mark.slow
@pytest.mark.parametrize("source", ["list", "sweep"])
def test_stacked_teachers_are_stacked_again_when_one_run_is_replaced(
    source: str, trained: dict[str, Path], tmp_path: Path
) -> None:
    """Several runs: a list (cached under outputs/teacher-cache/) or a sweep folder's jobs
    (cached in the sweep folder, where a replaced job leaves the old cache)."""
    a, b = (tmp_path / "sweep" / "0", tmp_path / "sweep" / "1")
    shutil.copytree(trained["seed0"], a)
    shutil.copytree(trained["seed5"], b)
    (tmp_path / "sweep" / "multirun.yaml").write_text("{}\n")
    teachers = "teachers=[sweep/0,sweep/1]" if source == "list" else "teachers=sweep"
    first = run(tmp_path, *STUDENT, teachers)
    assert "stacked their logits into" in first.stdout
    # b deleted, and seed 0 trained again into it: the same files as a's, but another run
    shutil.rmtree(b)
    shutil.copytree(trained["seed0"], b)
    artifacts.write_json(b / "manifest.json", {**manifest(b), "run_id": artifacts.new_run_id()})
    second = run(tmp_path, *STUDENT, teachers)
    assert "stacked their logits into" in second.stdout and "logits from" not in second.stdout


@pytest.mark.slow
def test_copied_teachers_keep_their_caches(trained: dict[str, Path], tmp_path: Path) -> None:
    original = tmp_path / "original"
    shutil.copytree(trained["seed0"], original)
    built = run(tmp_path, *STUDENT, *VIEWS, f"teachers={original}")
    assert "caching 9 views" in built.stdout
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original, copy)  # copytree keeps the files' modification times
    (cache,) = (copy / "view-cache").glob("*.pt")
    stamp = cache.stat()
    reused = run(tmp_path, *STUDENT, *VIEWS, f"teachers={copy}")
    assert f"view cache: {cache}" in reused.stdout and "caching" not in reused.stdout
    after = cache.stat()
    assert (after.st_ino, after.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)
    recorded = manifest(sorted((tmp_path / "outputs" / "distill").iterdir())[-1])
    (teachers,) = recorded["input_runs"]["teachers"]
    assert teachers["path"] == str(copy) and teachers["run_id"] == manifest(original)["run_id"]
    # Other teachers' logits put in the copy: refused, not cached under the copy's id.
    shutil.copy(trained["seed5"] / "logits.pt", copy / "logits.pt")
    edited = run(tmp_path, *STUDENT, f"teachers={copy}", check=None)
    assert_one_line_error(edited, f"{copy / 'logits.pt'} is not the file its run wrote")


def held_folder(folder: Path, status: str) -> dict[str, tuple[bytes, int]]:
    """A folder holding a train-teachers run of that status; its snapshot."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    artifacts.write_manifest(folder, stage="train-teachers", status=status)
    return snapshot(folder)


@pytest.mark.slow
def test_a_folder_holding_a_run_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    complete, unfinished = tmp_path / "complete", tmp_path / "unfinished"
    before = {complete: held_folder(complete, "complete")}
    before[unfinished] = held_folder(unfinished, "interrupted")
    result = run(tmp_path, *TEACHERS, f"hydra.run.dir={complete}", check=None)
    assert_one_line_error(result, f"hydra.run.dir={complete} holds a complete", "a fresh folder")
    result = run(tmp_path, *TEACHERS, f"hydra.run.dir={unfinished}", check=None)
    assert_one_line_error(
        result,
        f"hydra.run.dir={unfinished} holds an unfinished train-teachers run",
        f"`distillrun train-teachers resume={unfinished}`",
    )
    # A sweep whose second job would land on a complete run: refused before any job starts.
    sweep = tmp_path / "sweep"
    before[sweep / "1"] = held_folder(sweep / "1", "complete")
    result = run(tmp_path, *TEACHERS, "-m", "seed=0,1", f"hydra.sweep.dir={sweep}", check=None)
    assert_one_line_error(result, f"hydra.sweep.dir={sweep / '1'} holds a complete")
    assert [p.name for p in sweep.iterdir()] == ["1"]  # no job 0, no multirun.yaml
    for folder, files in before.items():
        assert snapshot(folder) == files


@pytest.mark.slow
def test_a_resume_on_teachers_that_changed_is_refused(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    teachers = tmp_path / "teachers"
    shutil.copytree(trained["seed0"], teachers)
    run(tmp_path, *STUDENT, f"teachers={teachers}", "hydra.run.dir=student")
    student = tmp_path / "student"
    first = manifest(student)

    def interrupted() -> None:
        (student / "manifest.json").write_text(json.dumps({**first, "status": "interrupted"}))

    interrupted()  # unchanged teachers: the resume goes ahead, and keeps the run's id
    run(tmp_path, "distill", f"resume={student}")
    assert manifest(student)["status"] == "complete"
    assert manifest(student)["run_id"] == first["run_id"]

    interrupted()
    shutil.rmtree(teachers)
    shutil.copytree(trained["seed5"], teachers)  # another run where the teachers were
    before = snapshot(student)
    result = run(tmp_path, "distill", f"resume={student}", check=None)
    assert_one_line_error(result, f"resume={student}", "now holds another run", "start a new run")
    assert snapshot(student) == before
