"""How the smoke kit's failures read: the "cannot run here" error and an exception's first line."""

from __future__ import annotations


class BackendUnavailableError(RuntimeError):
    """The kit cannot run here; the message is the one line it prints."""


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``: the note a FAIL row or a refusal carries.

    Kernel errors of CANN come with a long trace; its first line says what went wrong, the rest
    would break the table's one-line rows.
    """
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
