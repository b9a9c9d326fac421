"""The benchmark protocols by name: what ``skillbank bench --protocol NAME`` runs.

Every built-in protocol is imported here, explicitly, and registered nowhere else:
``continual`` (learners over a task stream, ``eval.runner``), ``tta`` (test-time
adaptation over a corruption stream, ``eval.tta``) and ``transfer`` (few-shot
composition of banked skills, ``eval.transfer``).
"""

from __future__ import annotations

import skillbank as sb
from eval import runner, transfer, tta
from eval.driver import Protocol

PROTOCOLS: dict[str, Protocol] = {
    p.name: p for p in (runner.PROTOCOL, tta.PROTOCOL, transfer.PROTOCOL)
}


def register_protocol(protocol: Protocol) -> Protocol:
    """Add ``protocol`` under its name (a name already taken is refused); returns it."""
    if not isinstance(protocol, Protocol):
        raise sb.ConfigError(f"register an eval.driver.Protocol, not {type(protocol).__name__}")
    if protocol.name in PROTOCOLS:
        raise sb.ConfigError(f"protocol {protocol.name!r} is already registered")
    PROTOCOLS[protocol.name] = protocol
    return protocol


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; an unknown name is a ConfigError listing the known ones."""
    try:
        return PROTOCOLS[name]
    except (KeyError, TypeError):
        raise sb.ConfigError(
            f"unknown protocol {name!r}; choose from {sorted(PROTOCOLS)}"
        ) from None
