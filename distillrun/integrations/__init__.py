"""Integrations that depend on the core, never the reverse: experiment trackers and
the Optuna search."""
