"""A persistent helper process with a hard per-call timeout: the parent can always kill it.

`Worker("pkg.mod:handle")` starts `python -m posttrain.envs._worker pkg.mod:handle`, which imports the target
once, then answers length-prefixed pickled requests on stdin/stdout with `handle(request)`. A call that
overruns its timeout kills the process (the next call starts a fresh one), so a hung third-party verifier
(math-verify on adversarial LaTeX, a reasoning-gym scorer) costs one sample, never the run.

The child inherits the parent's environment and sys.path (as PYTHONPATH) so that any importable env class
unpickles there. It is NOT a sandbox: it runs trusted verifier code; model-written programs go through
envs/sandbox.py instead. Messages are pickles: only ever exchange them with a child this module started.
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
import traceback
import weakref
from typing import Any

_HEADER = struct.Struct(">Q")
READY = ("ready",)
_LIVE: weakref.WeakSet[Worker] = weakref.WeakSet()


class WorkerDied(RuntimeError):
    """The worker process exited (crashed, was killed, or failed to import its target)."""


class Worker:
    """One child process running `target` (an import path `pkg.mod:function`).

    Non-blocking use (for a pool): `start()`, `send(msg)`, `fileno()` in select, `poll()` -> a reply or None.
    Blocking use: `call(msg, timeout_s)`. Replies are ("ok", value) or ("err", type_name, message, traceback).
    """

    def __init__(self, target: str, startup_timeout_s: float = 120.0):
        self.target = target
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self._buf = bytearray()
        self.state: Any = None  # free slot for the owner (the pool records which env this worker holds)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.kill()
        paths = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        self.proc = subprocess.Popen([sys.executable, "-m", "posttrain.envs._worker", self.target],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.ready = False
        _LIVE.add(self)

    def fileno(self) -> int:
        assert self.proc is not None and self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def send(self, msg: Any) -> None:
        if not self.alive:
            raise WorkerDied(f"worker {self.target} is not running")
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.proc.stdin.write(_HEADER.pack(len(data)) + data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise WorkerDied(f"worker {self.target} exited: {e}") from e

    def poll(self) -> Any:
        """Read what is available (call when select says readable); the first complete reply, or None.
        The startup handshake arrives as the reply READY (and sets `ready`)."""
        chunk = os.read(self.fileno(), 1 << 16)
        if not chunk:
            code = self.proc.wait() if self.proc else None
            self.kill()
            raise WorkerDied(f"worker {self.target} exited with code {code} (see its stderr above)")
        self._buf += chunk
        return self._take()

    def _take(self) -> Any:
        if len(self._buf) < _HEADER.size:
            return None
        (n,) = _HEADER.unpack_from(self._buf)
        if len(self._buf) < _HEADER.size + n:
            return None
        reply = pickle.loads(bytes(self._buf[_HEADER.size:_HEADER.size + n]))
        del self._buf[:_HEADER.size + n]
        if reply == READY:
            self.ready = True
        return reply

    def recv(self, timeout_s: float) -> Any:
        """Block until the next reply; TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        reply = self._take()
        while reply is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"worker {self.target}: no reply within {timeout_s:g}s")
            if select.select([self.fileno()], [], [], left)[0]:
                reply = self.poll()
        return reply

    def ensure_ready(self) -> None:
        """Start the process if needed and wait (up to startup_timeout_s) for its handshake."""
        if self.alive and self.ready:
            return
        self.start()
        try:
            while self.recv(self.startup_timeout_s) != READY:
                pass
        except TimeoutError:
            self.kill()
            raise

    def call(self, msg: Any, timeout_s: float) -> Any:
        """Send one request and wait at most timeout_s for its reply; on timeout the process is killed and
        TimeoutError raised. Startup (importing the target) is not counted against timeout_s."""
        self.ensure_ready()
        self.send(msg)
        try:
            return self.recv(timeout_s)
        except TimeoutError:
            self.kill()
            raise

    def kill(self) -> None:
        proc, self.proc, self.ready, self.state = self.proc, None, False, None
        self._buf.clear()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass

    def __del__(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()


@atexit.register
def _kill_all() -> None:
    for w in list(_LIVE):
        w.kill()


def _child_main(target: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # prints of the handler go to stderr, never into the protocol stream
    inp = sys.stdin.buffer

    def write(obj: Any) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(_HEADER.pack(len(data)) + data)
        out.flush()

    module, _, attr = target.partition(":")
    handle = getattr(importlib.import_module(module), attr)
    write(READY)
    while True:
        header = inp.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return  # the parent closed the pipe (or exited)
        (n,) = _HEADER.unpack(header)
        try:
            reply = ("ok", handle(pickle.loads(inp.read(n))))
            write(reply)
        except Exception as e:  # noqa: BLE001 - every failure goes back to the parent, tagged
            write(("err", type(e).__name__, str(e)[:2000], traceback.format_exc()[-4000:]))


if __name__ == "__main__":
    _child_main(sys.argv[1])
