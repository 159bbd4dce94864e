"""The package version (one place; the run record and pyproject read it)."""

__version__ = "0.1.0"
