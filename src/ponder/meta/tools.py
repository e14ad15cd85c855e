"""Tools a chain can call: a calculator and a sandboxed Python interpreter.

A tool is a callable ``text -> ToolResult``: what it printed, whether it worked, and
why not (in words a model, or a user, can act on). Tools never raise on bad input:
an error is a result, since the model that wrote the call must read it.

* ``Calculator``: arithmetic on numbers (+ - * / // % ** and parentheses), evaluated on
  the parsed expression tree, never by ``eval``; huge powers are refused.
* ``PythonSandbox``: code run in a separate interpreter (program-aided reasoning, Gao
  et al. 2023; Chen et al. 2023) with limits on CPU time, memory, output and file size,
  in a temporary working directory that is deleted afterwards, with an empty
  environment and no network. The layers, each enough for its threat:
  - resource limits (``setrlimit``: CPU seconds, address space, file size, open files,
    no core dumps) and a wall-clock timeout, after which the whole process group is
    killed (so are any processes it started);
  - an audit hook (PEP 578), installed before the code runs, that refuses sockets,
    process creation (fork, exec, spawn, subprocess, system) and writes outside the
    working directory; Python offers no way to remove an audit hook;
  - on Linux, a new network namespace when the kernel allows one (as root, or with
    unprivileged user namespaces), in which no interface is up: even code that got
    past the hook would find no network. ``PythonSandbox.isolation`` says which layers
    are active.
  Output beyond ``max_output`` bytes is cut and the run stopped ("output limit").
"""

from __future__ import annotations

import ast
import operator
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from ..errors import SettingError


@dataclass
class ToolResult:
    """``ok``: the tool ran and succeeded. ``output``: what it printed (or the value).
    ``error``: why it failed, one line. ``reason``: ok, error, timeout, cpu limit,
    memory limit, output limit or blocked."""

    ok: bool
    output: str
    error: str = ""
    reason: str = "ok"
    wall_s: float = 0.0

    def text(self) -> str:
        """What the model reads back."""
        return self.output if self.ok else (self.output + ("\n" if self.output else "") + f"Error: {self.error}")


# -- calculator -----------------------------------------------------------------------------
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class Calculator:
    """Evaluate an arithmetic expression exactly (integers stay integers)."""

    name = "calculator"

    def __init__(self, max_exponent: int = 1000, max_length: int = 1000) -> None:
        if not isinstance(max_exponent, int) or max_exponent < 1:
            raise SettingError(f"max_exponent must be an integer >= 1; got {max_exponent!r}")
        self.max_exponent, self.max_length = max_exponent, max_length

    def __call__(self, expression: str) -> ToolResult:
        t0 = time.perf_counter()
        expr = expression.strip()
        if not expr:
            return ToolResult(False, "", "empty expression", "error")
        if len(expr) > self.max_length:
            return ToolResult(False, "", f"expression longer than {self.max_length} characters", "error")
        try:
            value = self._eval(ast.parse(expr, mode="eval").body)
        except SyntaxError:
            return ToolResult(False, "", f"not an arithmetic expression: {expr!r}", "error")
        except (ValueError, ZeroDivisionError, OverflowError) as e:
            return ToolResult(False, "", str(e) or type(e).__name__, "error")
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)
        return ToolResult(True, str(value), wall_s=time.perf_counter() - t0)

    def _eval(self, node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](self._eval(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            a, b = self._eval(node.left), self._eval(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > self.max_exponent:
                raise ValueError(f"exponent {b} is above the limit {self.max_exponent}")
            return _BINARY[type(node.op)](a, b)
        raise ValueError(f"only numbers, + - * / // % ** and parentheses are allowed; found {type(node).__name__}")


# -- Python sandbox -------------------------------------------------------------------------
# Runs in the child before the user's code: limits, network namespace, audit hook. The
# user's code comes on stdin, so it never appears in a process listing.
_RUNNER = r"""
import ctypes, os, resource, sys
cpu, mem, fsize, workdir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
code = sys.stdin.read()
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
netns = False
try:  # a network namespace with no interface up (Linux; root or unprivileged user namespaces)
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
    netns = libc.unshare(CLONE_NEWNET) == 0 or libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0
except Exception:
    pass
sys.stderr.write("@@netns=%d\n" % netns)
sys.stderr.flush()
PROCESS = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
           "pty.spawn", "os.kill", "os.killpg"}
_wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def hook(event, args, _p=PROCESS, _wflags=_wflags, _w=os.path.realpath(workdir) + os.sep, _rp=os.path.realpath):
    if event.startswith("socket."):
        raise PermissionError("sandbox: network access is disabled")
    if event in _p:
        raise PermissionError("sandbox: starting processes is disabled (%s)" % event)
    if event == "open" and (any(c in str(args[1]) for c in "wax+") if args[1] is not None else
                            isinstance(args[2], int) and args[2] & _wflags):
        if isinstance(args[0], (str, bytes)) and not (_rp(args[0]) + os.sep).startswith(_w):
            raise PermissionError("sandbox: writing outside the working directory is disabled")
    if event in ("ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata"):
        raise PermissionError("sandbox: ctypes is disabled")
sys.addaudithook(hook)
del ctypes, libc, resource
g = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(code, "<sandbox>", "exec"), g)
except MemoryError:
    sys.stderr.write("\n@@reason=memory limit\n")
    sys.exit(1)
except SystemExit:
    raise
except BaseException as e:
    import traceback
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    sys.stderr.write("".join(x for x in tb if 'File "<string>"' not in x))
    if isinstance(e, PermissionError) and str(e).startswith("sandbox:"):
        sys.stderr.write("\n@@reason=blocked\n")
    sys.exit(1)
"""


class PythonSandbox:
    """Run Python code in a limited subprocess; see the module docstring for the layers.

    ``cpu_seconds``: CPU time (the process gets SIGXCPU); ``timeout``: wall seconds
    (default ``2 * cpu_seconds + 3``; a process sleeping or blocked is killed there);
    ``memory_mb``: address space; ``max_output``: bytes of stdout + stderr kept;
    ``max_file_mb``: the largest file it may write."""

    name = "python"

    def __init__(self, cpu_seconds: int = 5, memory_mb: int = 256, timeout: float | None = None,
                 max_output: int = 10_000, max_file_mb: int = 10, python: str | None = None) -> None:
        for key, v, lo in (("cpu_seconds", cpu_seconds, 1), ("memory_mb", memory_mb, 32), ("max_output", max_output, 1),
                           ("max_file_mb", max_file_mb, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise SettingError(f"{key} must be an integer >= {lo}; got {v!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise SettingError(f"timeout must be a number of seconds > 0; got {timeout!r}")
        if sys.platform == "win32":
            raise SettingError("the Python sandbox needs a POSIX system (resource limits, process groups)")
        self.cpu_seconds, self.memory_mb, self.max_output, self.max_file_mb = cpu_seconds, memory_mb, max_output, max_file_mb
        self.timeout = float(timeout) if timeout is not None else 2.0 * cpu_seconds + 3.0
        self.python = python or sys.executable
        self.isolation: list[str] = []  # the layers active in the last run

    def __call__(self, code: str) -> ToolResult:
        t0 = time.perf_counter()
        if not isinstance(code, str) or not code.strip():
            return ToolResult(False, "", "no code to run", "error")
        with tempfile.TemporaryDirectory(prefix="ponder-sandbox-") as workdir:
            argv = [self.python, "-I", "-c", _RUNNER, str(self.cpu_seconds), str(self.memory_mb << 20),
                    str(self.max_file_mb << 20), workdir]
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=workdir, env=env, start_new_session=True)
            out, err, cut, timed_out = self._communicate(proc, code)
        return self._result(proc.returncode, out, err, cut, timed_out, time.perf_counter() - t0)

    def _communicate(self, proc: subprocess.Popen, code: str) -> tuple[bytes, bytes, bool, bool]:
        """Feed the code, read both pipes up to the output cap, enforce the wall clock,
        and always kill the process group at the end (leftover children included)."""
        bufs = {"out": bytearray(), "err": bytearray()}
        cut = threading.Event()

        def read(stream, key):
            while chunk := stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536):
                room = self.max_output + 4096 - len(bufs[key])  # stderr keeps a little more, for the reason
                bufs[key] += chunk[: max(0, room)]
                if sum(len(b) for b in bufs.values()) > self.max_output + 4096 or (key == "out" and len(bufs["out"]) > self.max_output):
                    cut.set()
                    _kill_group(proc)
                    break

        readers = [threading.Thread(target=read, args=(proc.stdout, "out"), daemon=True),
                   threading.Thread(target=read, args=(proc.stderr, "err"), daemon=True)]
        for r in readers:
            r.start()
        try:
            proc.stdin.write(code.encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        timed_out = False
        try:
            proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc)
        proc.wait()
        for r in readers:
            r.join(timeout=5)
        return bytes(bufs["out"]), bytes(bufs["err"]), cut.is_set(), timed_out

    def _result(self, rc: int, out_b: bytes, err_b: bytes, cut: bool, timed_out: bool, wall: float) -> ToolResult:
        out = out_b[: self.max_output].decode("utf-8", "replace")
        err = err_b.decode("utf-8", "replace")
        self.isolation = ["rlimits", "process group", "audit hook"]
        if "@@netns=1" in err:
            self.isolation.append("network namespace")
        marks = [ln[len("@@reason="):] for ln in err.splitlines() if ln.startswith("@@reason=")]
        err = "\n".join(ln for ln in err.splitlines() if not ln.startswith("@@")).strip()
        last = err.splitlines()[-1] if err else ""
        if cut:
            return ToolResult(False, out, f"output above {self.max_output} bytes was cut and the run stopped",
                              "output limit", wall)
        if timed_out:
            return ToolResult(False, out, f"no result within {self.timeout:g} s wall time; the process was killed",
                              "timeout", wall)
        if rc in (-signal.SIGXCPU, -signal.SIGKILL) or rc == 128 + signal.SIGXCPU:
            return ToolResult(False, out, f"CPU time above {self.cpu_seconds} s; the process was killed", "cpu limit", wall)
        if "memory limit" in marks or last.startswith("MemoryError"):
            return ToolResult(False, out, f"memory above {self.memory_mb} MB", "memory limit", wall)
        if "blocked" in marks:
            return ToolResult(False, out, last.split(": ", 1)[-1], "blocked", wall)
        if rc != 0:
            return ToolResult(False, out, last or f"exit status {rc}", "error", wall)
        return ToolResult(True, out, wall_s=wall)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
