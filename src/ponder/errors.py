"""The errors ponder raises on bad input. Imports nothing.

Every layer raises these, so they sit at the bottom. Each message names the argument
and its legal range; the CLI prints it as one line with exit status 2.
"""

from __future__ import annotations


class SettingError(ValueError):
    """A setting or input is outside its legal range (the message says what to change).
    ``setting``: the name of the setting at fault, as the library spells it (``samples``,
    ``top_k``, ``level``), so that each surface can name it as its user wrote it: the
    command line's flag, a sweep file's key, the server's request field."""

    def __init__(self, message: str = "", setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class CheckpointError(SettingError):
    """A checkpoint folder cannot be loaded: the message names the file and what is wrong."""


class InvalidLogitsError(RuntimeError):
    """After the processor chain a row's scores hold NaN or +inf, or no finite entry
    (every token masked): the request cannot pick a token. Names the culprit."""


class RequestCancelled(RuntimeError):
    """The caller cancelled the request (asyncio cancellation, an abandoned stream)."""


class BackendError(RuntimeError):
    """A remote model server could not serve a request: unreachable, or still failing
    after the bounded retries, or answering something that is not a completion. The
    message names the server, the request and what it answered."""
