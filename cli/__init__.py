"""The `skillbank` console script: ``skillbank = "cli:app"``."""

from .app import app

__all__ = ["app"]
