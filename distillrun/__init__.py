"""distillrun: an experiment runner for knowledge distillation (Hinton, Vinyals and Dean, 2015)."""

__version__ = "0.1.0"
