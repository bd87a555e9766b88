"""The one error every process shares: a setting that is missing or malformed."""
from __future__ import annotations


class ConfigError(Exception):
    """A setting is missing or malformed. The message names the variable, never its value."""
