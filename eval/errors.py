"""Errors of the evaluation layer, in skillbank's one error family."""

from __future__ import annotations

from skillbank.errors import SkillbankError


class InvalidStream(SkillbankError, ValueError):
    """Task or stream data that cannot be trained on (empty, bad labels, bad shapes)."""


__all__ = ["InvalidStream"]
