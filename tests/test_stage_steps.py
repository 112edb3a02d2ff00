"""The named steps of the stage bodies, called on their own: the one teacher resolution of
distill, specialists and evaluate (the first line it says, the notes after it, the input it
records), the teachers' error rates, and the losses and views that were closures."""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from distillrun.errors import UserError
from distillrun.method.augment import Batch
from distillrun.method.teacher_outputs import CachedLogits
from distillrun.runs.teacher_runs import ChosenTeachers, error_rate
from distillrun.stages import common, distill, evaluate, specialists
from distillrun.stages.common import Run, resolve_teachers
from distillrun.stages.specialists import corrected_view, dustbin_loss
from distillrun.stages.train_teachers import hard_label_loss


def one_hot_logits(classes: list[int], scale: float) -> torch.Tensor:
    return scale * F.one_hot(torch.tensor(classes), 3).float()


# Where the members disagree, the ensemble follows member 0, the far more confident one.
VAL = torch.stack([one_hot_logits([0, 1, 2, 0], 10), one_hot_logits([0, 1, 2, 1], 1)])
TEST = torch.stack([one_hot_logits([0, 1, 2, 2], 10), one_hot_logits([0, 1, 0, 0], 1)])
FILE = Path("/runs/T/logits.pt")
DATA = SimpleNamespace(y_val=torch.tensor([0, 1, 2, 1]), y_test=torch.tensor([0, 1, 2, 2]))


def chosen(members: list[int] | None = None, source: str = "/runs/T") -> ChosenTeachers:
    logits = {"train": VAL, "val": VAL, "test": TEST}
    return ChosenTeachers(source, [{"run_id": "r1"}], logits, FILE, members=members)


def test_the_teachers_error_rates_are_their_ensembles_on_val_and_test() -> None:
    assert error_rate(VAL, DATA.y_val, "arithmetic") == 0.25  # member 0 wins the last one
    assert error_rate(TEST[1:], DATA.y_test, "arithmetic") == 0.5
    assert error_rate(VAL[:, :0], DATA.y_val[:0], "arithmetic") is None
    outvoted = torch.stack(
        [one_hot_logits([1], 10), one_hot_logits([0], 10), one_hot_logits([0], 10)]
    )
    assert error_rate(outvoted, torch.tensor([0]), "geometric") == 0.0  # the ensemble, not one
    assert chosen().summary(DATA) == (
        "2 members; logits from /runs/T/logits.pt; arithmetic ensemble: val error 25.0%, "
        "test error 0.0%"
    )
    # One member of a run (a generalist): that member's figures, not the ensemble's.
    assert chosen([1]).summary(DATA) == (
        "member 1 of 2; logits from /runs/T/logits.pt; val error 0.0%, test error 50.0%"
    )


def test_resolve_teachers_says_the_choice_first_then_the_notes_and_records_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    said: list[str] = []
    monkeypatch.setattr(common, "say", said.append)
    asked = []

    def find(named, note):
        asked.append(named)
        note("skipped 1 unfinished or failed train-teachers run(s)")
        return chosen()

    run = Run("distill", tmp_path, torch.device("cpu"))
    found = resolve_teachers(run, "teachers", None, find, DATA, ["an earlier note"])
    assert found.source == "/runs/T" and asked == [None]
    assert said == [
        "distill: teachers /runs/T (2 members; logits from /runs/T/logits.pt; arithmetic "
        "ensemble: val error 25.0%, test error 0.0%)",
        "an earlier note",
        "skipped 1 unfinished or failed train-teachers run(s)",
    ]
    assert run.inputs == {"teachers": "/runs/T"}
    assert run.info["input_runs"] == {"teachers": [{"run_id": "r1"}]}


def test_when_no_teachers_are_found_what_was_skipped_is_still_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    said: list[str] = []
    monkeypatch.setattr(common, "say", said.append)

    def find(named, note):
        note("skipped 2 unfinished or failed train-teachers run(s)")
        raise UserError("no complete train-teachers run")

    run = Run("distill", tmp_path, torch.device("cpu"))
    with pytest.raises(UserError, match="no complete"):
        resolve_teachers(run, "teachers", None, find, DATA)
    assert said == ["skipped 2 unfinished or failed train-teachers run(s)"]
    assert run.inputs == {}


def test_a_resumed_run_keeps_the_teachers_it_began_with_unless_named(tmp_path: Path) -> None:
    asked = []

    def find(named, note):
        asked.append(named)
        return chosen()

    def resumed() -> Run:
        run = Run("distill", tmp_path, torch.device("cpu"), resuming=True)
        run.inputs["teachers"] = "[/runs/A, /runs/B]"
        return run

    resolve_teachers(resumed(), "teachers", None, find, DATA)
    resolve_teachers(resumed(), "teachers", "/runs/C", find, DATA)
    resolve_teachers(Run("distill", tmp_path, torch.device("cpu")), "teachers", None, find, DATA)
    assert asked == [["/runs/A", "/runs/B"], "/runs/C", None]


@pytest.mark.parametrize("module", [distill, specialists, evaluate])
def test_distill_specialists_and_evaluate_resolve_their_teachers_one_way(module) -> None:
    body = ast.parse(inspect.getsource(getattr(module, module.__name__.split(".")[-1])))
    called = {
        n.func.id for n in ast.walk(body) if isinstance(n, ast.Call) and hasattr(n.func, "id")
    }
    assert "resolve_teachers" in called
    assert not {"find_teachers", "find_generalist", "load_run_logits"} & called


def test_distill_loss_takes_the_teacher_outputs_of_the_batch_examples() -> None:
    torch.manual_seed(0)
    teacher_logits = torch.randn(1, 6, 4)
    idx = torch.tensor([4, 1, 3])
    out = teacher_logits[0, idx].clone()  # a student that matches its teacher exactly
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    cfg = OmegaConf.create(
        {"loss": {"name": "kd", "standardize": False}, "T": 2.0, "ensemble": "arithmetic"}
    )
    teacher = CachedLogits({"logits": teacher_logits}, 4)
    batch = Batch(idx, torch.zeros(3, 1))
    soft_only = distill.distill_loss_fn(cfg, teacher, None, 4, alpha=0.5)
    assert float(soft_only(out, batch)) == pytest.approx(0.0, abs=1e-6)
    both = distill.distill_loss_fn(cfg, teacher, y, 4, alpha=0.5)
    assert float(both(out, batch)) == pytest.approx(0.5 * float(F.cross_entropy(out, y[idx])))


def test_the_hard_label_and_dustbin_losses_take_the_labels_of_the_batch_examples() -> None:
    y = torch.tensor([0, 1, 2, 3])
    out = torch.randn(2, 4)
    batch = Batch(torch.tensor([3, 1]), torch.zeros(2, 1))
    assert torch.equal(hard_label_loss(out, batch, y=y, classes=4), F.cross_entropy(out, y[[3, 1]]))
    target = torch.tensor([1, 0, 1, 1])  # specialist on class 1: class 1 -> 0, else dustbin 1
    batch = Batch(torch.tensor([1, 3]), torch.zeros(2, 1))
    dustbin = dustbin_loss(out[:, :2], batch, target=target)
    assert torch.equal(dustbin, F.cross_entropy(out[:, :2], torch.tensor([0, 1])))


def test_a_specialist_is_judged_with_its_dustbin_correction_applied() -> None:
    # A dustbin head over classes [0, 1], all logits equal: the dustbin logit gains log 3.
    logits = torch.zeros(1, 3)
    view = corrected_view(
        logits, classes=[0, 1], rest_classes=torch.tensor([2]), shift=math.log(3), full=False
    )
    assert view.exp()[0].tolist() == pytest.approx([0.2, 0.2, 0.6])
    assert torch.equal(logits, torch.zeros(1, 3))  # the caller's logits are left as they were
    # A full softmax over 5 classes: every non-special class gains log 2, then they collapse.
    view = corrected_view(
        torch.zeros(1, 5),
        classes=[0, 1],
        rest_classes=torch.tensor([2, 3, 4]),
        shift=math.log(2),
        full=True,
    )
    assert view.exp()[0].tolist() == pytest.approx([0.125, 0.125, 0.75])
