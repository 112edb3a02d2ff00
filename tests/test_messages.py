"""What the console says beside a stage's own lines: nothing a user did not ask for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_a_first_plot_prints_no_font_cache_line(tmp_path: Path) -> None:
    """matplotlib logs "generated new fontManager" at INFO when it builds its font cache (a first
    plot on a machine); Hydra's job logging prints INFO, so it reached the console."""
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from pathlib import Path\n"
        "from distillrun.runs import artifacts\n"
        "plt = artifacts.pyplot()\n"
        "fig, ax = plt.subplots()\n"
        "ax.set_title('x')\n"
        f"artifacts.save_figure(fig, Path({str(tmp_path / 'f.png')!r}))\n"
    )
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl")}  # an empty font cache
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert "fontManager" not in out.stdout + out.stderr, out.stdout + out.stderr


def test_predict_on_a_missing_folder_names_exports_among_what_it_takes(tmp_path: Path) -> None:
    import pytest
    import torch

    from distillrun.errors import UserError
    from distillrun.stages.predict import load_predictor

    with pytest.raises(UserError) as e:
        load_predictor(tmp_path / "nope", None, torch.device("cpu"))
    assert "an export folder" in str(e.value) and "distill" in str(e.value)


def test_a_preset_for_another_stage_is_the_only_problem_said() -> None:
    """Its keys belong to another stage (here teachers.n), so their problems only confuse."""
    import pytest
    from test_config import composed

    from distillrun.config import validate
    from distillrun.errors import UserError

    with pytest.raises(UserError) as e:
        validate("distill", composed("distill", "experiment=mnist_cnn_teachers"))
    assert str(e.value) == (
        "experiment=mnist_cnn_teachers is a preset for `distillrun train-teachers`: "
        "use +experiment=hinton_mnist"
    )


def test_a_generator_preset_is_named_as_chosen_and_fingerprinted_as_its_generator() -> None:
    from omegaconf import OmegaConf
    from test_config import composed

    from distillrun.core.data import load_dataset

    cfg = composed("distill", "dataset=jft_like").dataset
    small = {"train_per_class": 5, "test_per_class": 2, "n_super": 2, "n_sub": 2}
    chosen = load_dataset(OmegaConf.merge(cfg, small))
    generator = load_dataset(OmegaConf.merge(cfg, small, {"display_name": None}))
    assert (chosen.name, generator.name) == ("jft_like", "hierarchical")
    assert chosen.fingerprint == generator.fingerprint
