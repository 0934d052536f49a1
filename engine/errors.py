"""Exceptions shared across the engine, kept free of imports.

:class:`ConfigError` lives here rather than in :mod:`engine.config` so that modules
which ``engine.config`` itself imports while validating (the parallel layout, the model
presets and the model builder) can raise it without importing ``engine.config`` back,
which would make an import cycle. ``engine.config.ConfigError`` is the same class.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid."""


class UnknownKeyError(ConfigError):
    """A config key the schema does not have; ``key`` is its dotted name (``rollout.temperature``)."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key
