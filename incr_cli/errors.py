"""Errors that the commands report as one line: the bottom layer, imported by every other."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad value in the composed config; the CLI prints it as one line and exits with status 2."""


class DiskFull(OSError):
    """No space left while writing a file; the previous version of the file is intact."""
