"""The ``ponder`` command: generate and score (generate.py), eval (evaluate.py), sweep,
report and view (results.py), serve, models and strategies (serving.py); flags and
shared parsing in options.py.

The token-level flags are not written here: they are derived from ``SamplingParams``'
fields (their names, defaults, legal ranges and help), so the CLI, the library and the
server cannot drift apart. Every bad input gets one line naming the argument and
exit status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import sys

import typer
from typer import Abort, Exit

from ..errors import BackendError, InvalidLogitsError, SettingError
from ..protocols import AccessError

# click's base exception, whichever click typer runs on (its own vendored copy in newer
# releases, the click package before): found through typer's public BadParameter.
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="ponder: inference-time algorithms for language models.",
)


class CliError(Exception):
    """An error to report as one line and exit status 2."""


def _fail(msg: str) -> None:
    raise CliError(msg)


def _quiet_loop_teardown(unraisable, _default=sys.__unraisablehook__) -> None:
    """Ctrl-C can land while an abandoned event loop is being collected: its ``__del__``
    then fails, and Python prints a traceback above the one-line message (seen once in
    CI, before the interrupt reached ``main``). A loop being thrown away has nothing left
    to report, so only that case is hidden; every other unraisable error is printed."""
    if getattr(unraisable.object, "__qualname__", "") == "BaseEventLoop.__del__":
        return
    _default(unraisable)


def main(argv: list[str] | None = None) -> None:
    sys.unraisablehook = _quiet_loop_teardown
    try:
        rc = app(args=argv, standalone_mode=False)
        if rc == 130:  # typer hands back Ctrl-C as an exit code when not standalone
            print("error: interrupted", file=sys.stderr)
            sys.unraisablehook = lambda unraisable: None  # as below
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except Exit as e:
        sys.exit(e.exit_code)
    except (Abort, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        # the work interrupted may leave an event loop running in a helper thread; its
        # collection at exit would print "Exception ignored ... Traceback" under the one line
        sys.unraisablehook = lambda unraisable: None
        sys.exit(130)
    except ClickException as e:
        param = getattr(e, "param", None)
        msg = e.format_message()
        opts = getattr(param, "opts", None) if param is not None else None
        where = f"{'/'.join(opts)}: " if opts and opts[0] not in msg else ""
        if msg:
            print(f"error: {where}{msg}", file=sys.stderr)
        sys.exit(2)
    except (CliError, SettingError, InvalidLogitsError, AccessError) as e:
        flag = _flag_for(argv, getattr(e, "setting", None))
        where = f"{flag}: " if flag and flag.split(" ")[0] not in str(e) else ""
        print(f"error: {where}{e}", file=sys.stderr)
        sys.exit(2)
    except BackendError as e:  # a server failed after the bounded retries: not the user's input
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:
        sys.exit(0)


def _flag_for(argv: list[str] | None, setting: str | None) -> str | None:
    """The command-line flag that sets ``setting`` in the command being run (``--top-k``,
    ``--level``), or ``--set NAME`` for a strategy's own setting; None when it has none."""
    if not setting:
        return None
    args = sys.argv[1:] if argv is None else argv
    try:
        import typer.main

        group = typer.main.get_command(app)
        cmd = next((group.commands[a] for a in args if a in getattr(group, "commands", {})), None)
    except Exception:  # naming the flag is a courtesy; the error itself is printed regardless
        return None
    if cmd is None:
        return None
    opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
    flag = "--" + setting.replace("_", "-")
    if flag in opts:
        return flag
    return f"--set {setting}" if "--set" in opts else None




# the commands register themselves on `app`
from . import generate, evaluate, serving, results  # noqa: E402,F401  (this order: the help lists them so)
