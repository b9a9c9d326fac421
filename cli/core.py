"""The app object, global options, bank opening and error handling shared by every command.

Nothing here imports torch, faiss or SQLAlchemy at module level: ``skillbank --help``
should cost what typer costs (the ``skillbank`` package itself may still import torch).
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console

if TYPE_CHECKING:
    from skillbank import SkillBank

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    help="skillbank: lifelong low-rank skills for frozen PyTorch backbones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals would dump whole tensors
)
db_app = typer.Typer(help="Catalog schema maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


@dataclass
class State:
    """Global options, set by the app callback for the commands of one invocation."""

    bank: str = "skills"
    blobs: str | None = None
    debug: bool = False
    quiet: bool = False


_STATE: contextvars.ContextVar[State | None] = contextvars.ContextVar(
    "skillbank_cli_state", default=None
)


def state() -> State:
    """The global options of the current invocation (typer vendors click, so no click context)."""
    return _STATE.get() or State()


@app.callback()
def main(
    ctx: typer.Context,
    bank: str = typer.Option(
        "skills",
        "--bank",
        "-b",
        envvar="SKILLBANK_URL",
        show_envvar=True,
        help="Bank directory (embedded SQLite) or SQLAlchemy URL.",
    ),
    blobs: str | None = typer.Option(
        None,
        "--blobs",
        envvar="SKILLBANK_BLOBS",
        show_envvar=True,
        help="Blob directory; required when --bank is a URL.",
    ),
    debug: bool = typer.Option(
        False,
        "--debug",
        help="Show full tracebacks on errors and third-party progress output.",
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress lines, only results and errors."
    ),
) -> None:
    """Browse and maintain a skill bank from the terminal."""
    ctx.obj = State(bank=bank, blobs=blobs, debug=debug, quiet=quiet)
    _STATE.set(ctx.obj)
    if debug:
        logging.basicConfig(level=logging.DEBUG)
        logging.getLogger("skillbank").setLevel(logging.DEBUG)


# ----------------------------------------------------------------- output
def out() -> Console:
    """stdout console; wide when piped so tables are not squeezed to 80 columns."""
    width = int(os.environ.get("COLUMNS", "0") or 0) or (None if sys.stdout.isatty() else 160)
    return Console(width=width, highlight=False, soft_wrap=False)


def err() -> Console:
    """Diagnostics go to stderr so stdout stays one parseable document."""
    return Console(stderr=True, highlight=False)


def progress() -> Console:
    """Progress lines: stderr, timestamped, never wrapped (logs are grepped); silent under
    ``--quiet``."""
    return Console(
        stderr=True, highlight=False, log_path=False, soft_wrap=True, quiet=state().quiet
    )


def emit_json(doc: Any) -> None:
    """Exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2, default=str, sort_keys=False) + "\n")
    sys.stdout.flush()


def note(message: str) -> None:
    err().print(message, markup=False)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one error line on stderr; ``raise fail(...)`` ends the command."""
    err().print(f"error: {message}", markup=False, style="red")
    return typer.Exit(code)


# ---------------------------------------------------------------- errors
def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _is_cli_flow(e: BaseException) -> bool:
    """Exit, Abort and usage errors belong to typer/click (which typer 0.29 vendors)."""
    return type(e).__module__.split(".")[0] in ("typer", "click")


def command(target: typer.Typer = app, name: str | None = None, **kw: Any) -> Callable[[F], F]:
    """``@app.command`` plus the error contract: one line and exit 1 for expected errors,
    the traceback only under ``--debug``."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if _is_cli_flow(e) or state().debug:
                    raise
                from sqlalchemy.exc import SQLAlchemyError

                from skillbank import SkillbankError

                if isinstance(e, (SkillbankError, OSError, SQLAlchemyError)):
                    raise fail(_one_line(e)) from None
                raise fail(
                    f"{type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback)"
                ) from None

        target.command(name=name, **kw)(run)
        return fn

    return deco


# ------------------------------------------------------------------ bank
def is_url(location: str) -> bool:
    return "://" in location


@contextmanager
def open_bank(create: bool = False) -> Iterator[SkillBank]:
    """The bank named by ``--bank``; read-only commands refuse to create an empty one."""
    st = state()
    if is_url(st.bank):
        if not st.blobs:
            raise typer.BadParameter(
                f"a catalog URL needs --blobs DIR (or SKILLBANK_BLOBS); got {st.bank}",
                param_hint="--blobs",
            )
    elif (
        not create and not (Path(st.bank) / "catalog.db").is_file() and not Path(st.bank).is_file()
    ):
        raise fail(f"no skill bank at {st.bank!r} (pass --bank PATH|URL or set SKILLBANK_URL)")
    from skillbank import SkillBank

    bank = SkillBank.open(st.bank, blobs=st.blobs)
    try:
        yield bank
    finally:
        bank.close()


# ------------------------------------------------------------- parsing
FILTER_KEYS = {
    "tag": "tags",
    "base": "base_id",
    "learner": "learner",
    "text": "text",
    "name": "name",
}


def parse_filters(filters: list[str] | None) -> dict[str, Any]:
    """``tag:k=v``, ``base:ID``, ``learner:NAME``, ``text:WORDS``, ``name:GLOB`` -> list/retrieve kwargs."""
    out: dict[str, Any] = {}
    for f in filters or []:
        kind, sep, value = f.partition(":")
        if not sep or kind not in FILTER_KEYS or not value:
            raise typer.BadParameter(
                f"{f!r}: expected one of {', '.join(k + ':...' for k in FILTER_KEYS)}",
                param_hint="--filter",
            )
        key = FILTER_KEYS[kind]
        if key == "tags":
            k, eq, v = value.partition("=")
            if not eq or not k:
                raise typer.BadParameter(
                    f"{f!r}: a tag filter is tag:KEY=VALUE", param_hint="--filter"
                )
            out.setdefault("tags", {})[k] = v
        elif key in out:
            raise typer.BadParameter(f"{kind}: given twice", param_hint="--filter")
        else:
            out[key] = value
    return out


def parse_pairs(pairs: list[str], what: str) -> dict[str, str]:
    """``k=v`` arguments as a dict (values may contain '=')."""
    out = {}
    for p in pairs:
        k, eq, v = p.partition("=")
        if not eq or not k:
            raise typer.BadParameter(f"{p!r}: expected KEY=VALUE", param_hint=what)
        out[k] = v
    return out


def interactive() -> bool:
    """Whether a human can answer a prompt (patched in tests)."""
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def confirm(question: str, yes: bool) -> None:
    """Go on only with ``--yes`` or an explicit interactive yes; never guess for a script."""
    if yes:
        return
    if not interactive():
        raise fail("refusing to delete without --yes (stdin is not interactive)")
    try:
        ok = typer.confirm(question, default=False, err=True)
    except Exception as e:  # Ctrl-C / Ctrl-D arrive as (vendored) click's Abort
        if type(e).__name__ != "Abort":
            raise
        ok = False
    if not ok:
        raise fail("aborted; nothing deleted")
