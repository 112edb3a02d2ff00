"""distillrun: an experiment runner for knowledge distillation (Hinton, Vinyals and Dean, 2015).

The command is `distillrun <stage>`; the method is also a library (docs/library.md):

    from distillrun import combine, distillation_loss, load_model

These names are imported on first use, so that `import distillrun` (and `distillrun --help`)
does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
_API = {
    "load_model": "distillrun.core.models",
    "build_model": "distillrun.core.models",
    "distillation_loss": "distillrun.method.losses",
    "combine": "distillrun.method.ensemble",
    "combine_kl": "distillrun.method.combination",
    "load_dataset": "distillrun.core.data",
    "fit": "distillrun.core.train",
    "TrainSettings": "distillrun.core.train",
    "UserError": "distillrun.errors",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'distillrun' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
