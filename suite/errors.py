"""User-facing errors: the CLI prints them as one line and exits 2, never a traceback."""

from __future__ import annotations

import re
import signal
import threading
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class UserError(Exception):
    """A mistake in the user's input (config, flag, path); the message names what and where."""


class MissingPathError(UserError):
    """A file or folder the config names is not there (a data root, a teacher checkpoint): for
    a matrix, a mistake in every cell, so it stops the whole matrix before any work."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (``timeout``, a scheduler's preemption, ``kill``): raised in the main
    thread as Ctrl-C is, so runs end KILLED, trials FAIL and checkpoints are kept, instead of
    the process dying with its MLflow run left RUNNING."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty):
    what a one-line error quotes of the library or database below, without its traceback or
    the SQL statement that follows the first line."""
    lines = str(e).strip().splitlines()
    return lines[0].strip() if lines else type(e).__name__


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within this block, SIGTERM raises ``Terminated`` in the main thread (elsewhere: no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        raise Terminated("SIGTERM")

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def parse_value(text: str) -> Any:
    """A command-line value as TOML reads it (3, 0.5, true, [1, 2], "x"); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignment(text: str, flag: str = "--set") -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"{flag} expects KEY=VALUE, got '{text}'")
    return key.strip(), parse_value(value.strip())


# ``scheme://user:password@host``: the password part, up to the last @ before the host (a
# password may hold '@' or ':' when not percent-encoded); and libpq's ``password=...`` keyword
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][\w+.-]*://[^/:@\s'\"]*:)(?P<pw>[^\s'\"/]*)@")
_KEYWORD_PASSWORD = re.compile(r"(?P<head>\b(?:password|passwd|pwd)=)(?P<pw>[^\s&;,)'\"]+)", re.I)
REDACTED = "***"


def redact(text: str) -> str:
    """``text`` with the passwords of any URLs in it replaced by ``***``
    (``postgresql+psycopg://bench:s3cret@db/x`` -> ``postgresql+psycopg://bench:***@db/x``):
    applied to everything the suite prints or records (params, tags, config artifacts, error
    lines), so a storage or tracking URL's credentials never reach a log or an MLflow store."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}@", text)
    return _KEYWORD_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}", text)


def redact_data(data: Any) -> Any:
    """``data`` (dicts, lists, strings and other values, e.g. a config) with every string
    redacted."""
    if isinstance(data, str):
        return redact(data)
    if isinstance(data, dict):
        return {k: redact_data(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return type(data)(redact_data(v) for v in data)
    return data


def unredacted_for_connect(url: str) -> str:
    """A URL read back from a store, ready to connect with: a password the suite redacted is
    dropped, so the driver takes it from its own sources (PGPASSWORD, ~/.pgpass) instead of
    sending ``***``."""
    return url.replace(f":{REDACTED}@", "@")
