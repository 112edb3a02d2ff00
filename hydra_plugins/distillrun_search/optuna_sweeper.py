"""`hydra/sweeper=optuna`: distillrun's Hydra sweeper over Optuna
(see distillrun/integrations/search.py).

Hydra imports every module under `hydra_plugins` when an app starts: this one registers the
config and imports neither Optuna nor torch until a search runs.
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module before it is in
# sys.modules, where a dataclass cannot resolve string annotations.
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class OptunaSearchConf:
    _target_: str = "hydra_plugins.distillrun_search.optuna_sweeper.OptunaSearchSweeper"
    n_trials: int = 20  # trials to finish (complete, pruned or failed), resumed ones included
    n_jobs: int = 1  # trials launched at once (with a parallel launcher)
    seed: int = 0  # of the TPE sampler
    study_name: str = "search"
    storage: str | None = None  # null: sqlite:///<sweep folder>/study.db
    # Minimised, from the job's manifest: the first metric, ties broken by the second.
    objective: list[str] = field(default_factory=lambda: ["val_errors", "val_nll"])
    monitor: str = "student"  # the model whose per-epoch validation score the pruner watches
    pruner: str = "median"  # median, hyperband or none
    n_startup_trials: int = 5  # median: complete trials before any pruning
    n_warmup_steps: int = 5  # median: epochs before a trial can be pruned


ConfigStore.instance().store(
    group="hydra/sweeper", name="optuna", node=OptunaSearchConf, provider="distillrun"
)


class OptunaSearchSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        from distillrun.errors import UserError
        from distillrun.integrations.search import run_search

        assert self.config is not None
        try:
            run_search(self.config, self.launcher, arguments)
        except UserError as e:  # settings the dispatcher's precheck did not see (--config-dir)
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            from distillrun.console import error_line

            error_line(self.config.hydra.job.config_name.replace("_", "-"), str(e))
            sys.exit(2)
