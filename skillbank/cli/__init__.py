"""The `skillbank` console script: ``skillbank = "skillbank.cli:app"``."""

from .app import app

__all__ = ["app"]
