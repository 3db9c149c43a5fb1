"""Run model-written Python in a separate, limited process and check it against tests.

    result = run_python("def f(x):\\n    return 2*x", calls=["f(3)"])         # RunResult, values == [{"value": 6}]
    score = check_function(program, [("f(3)", 6), ("f(0)", 0)])                # Score: 1.0 only if every case matches
    score = run_asserts(program, "assert f(3) == 6")                           # Score, assert-style tests

What is contained, layer by layer:
  process   a fresh `python -I -S -B` (no env vars honoured, no site-packages, no .pyc writes) in its own
            session; on timeout, on too much output, and after every run the whole process group is SIGKILLed.
  time      wall clock (Limits.timeout_s, enforced by the parent) and CPU seconds (RLIMIT_CPU).
  memory    RLIMIT_AS (address space): allocations beyond it raise MemoryError inside the child.
  output    stdout+stderr are read at most Limits.output_bytes; beyond that the group is killed.
  files     RLIMIT_FSIZE caps any file written; RLIMIT_NOFILE caps open files; RLIMIT_CORE=0; the cwd is a
            fresh temporary directory, deleted afterwards; HOME and TMPDIR point into it.
  env       the child gets a fixed environment (PATH, HOME, TMPDIR, LANG) and nothing of the parent's.
  processes RLIMIT_NPROC=0 (fork fails for a non-root user) and, because root ignores RLIMIT_NPROC, an audit
            hook (PEP 578) that refuses os.fork/forkpty/posix_spawn/exec*/spawn*/system, subprocess, pty,
            os.kill/killpg (the child cannot signal the trainer) and the _posixsubprocess/_ctypes imports.
  network   the audit hook refuses every socket.* event (socket creation, connect, bind, DNS lookups) and
            the _socket/_ssl imports.
  fs        the hook refuses writes (open for writing, remove, rename, mkdir, chmod, link, symlink, truncate,
            utime, ...) outside the work dir, reads outside the work dir and the Python stdlib (so not
            /proc/<pid>/environ of the trainer, not ~/.ssh), and os.open of a directory outside the work dir
            (which would let dir_fd-relative paths escape the check).
  limits    the hook refuses resource.setrlimit/prlimit, so a root child cannot raise its own limits.
Any refused operation is recorded; a run with one is scored 0 with error "forbidden" even if the program
caught the PermissionError.

What is NOT contained (be honest about it):
  * Audit hooks are not a security boundary (PEP 578 says so): a CPython bug, or native code reached some way
    we did not block, bypasses them. Then, running as root, the program has root's full power. The rlimits
    and process-group kill still hold. Operations that raise no audit event (os.mkfifo, os.mknod, reading
    /proc/self, os.setsid to leave the process group) are not checked.
  * No namespaces/seccomp: the child sees the same filesystem (read access to the stdlib tree), the same
    PID space and the same network stack (only the Python socket API is refused).
  * Tests run in the same interpreter as the program. With `run_asserts` a hostile program can make its own
    asserts pass (monkeypatching, objects whose __eq__ is always True, finding and printing the result
    marker). `check_function` closes that hole: the expected values never enter the child, which only
    returns JSON of the values it computed, and the parent compares them.
  For adversarial code at scale, run this inside a container or gVisor/nsjail/bubblewrap as well.

Limits are applied by the runner script in the child before any program byte is compiled, not in
subprocess's preexec_fn: preexec_fn is documented as unsafe when the parent has threads (the RL loop and
score_many's thread isolation do).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.records import Score


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0  # wall clock, parent-enforced
    cpu_s: int | None = None  # RLIMIT_CPU; None = ceil(timeout_s) + 1
    memory_mb: int = 512  # RLIMIT_AS
    output_bytes: int = 256 * 1024  # stdout + stderr read at most this much
    file_mb: int = 16  # RLIMIT_FSIZE
    open_files: int = 64  # RLIMIT_NOFILE


@dataclass(frozen=True)
class RunResult:
    """error is None on a clean run, else one of: timeout, memory, output_limit, file_limit, forbidden, syntax,
    exception, exit, crash, no_result."""

    error: str | None
    detail: str = ""
    values: list[dict[str, Any]] | None = None  # calls mode: {"value": v} or {"raised": "Type: msg"} per call
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None
    violations: list[str] = field(default_factory=list)
    unenforced: list[str] = field(default_factory=list)  # limits the OS refused to set (e.g. RLIMIT_AS on macOS)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


_RUNNER = r'''
import sys, os, json, resource
def _main():
    req = json.loads(sys.stdin.buffer.read())
    unenforced = []
    for name, soft, hard in req["rlimits"]:
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (AttributeError, ValueError, OSError) as e:
            unenforced.append(name + ": " + str(e))
    nonce, mode = req["nonce"], req["mode"]
    real = os.path.realpath
    work = real(os.getcwd())
    read_roots = (work, real(sys.base_prefix), real(sys.base_exec_prefix), "/dev/null", "/dev/urandom")
    blocked = ("os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system", "os.kill",
               "os.killpg", "os.startfile", "subprocess.", "pty.", "socket.", "ctypes.", "signal.pthread_kill",
               "resource.setrlimit", "resource.prlimit")
    bad_imports = {"_posixsubprocess", "_ctypes", "_socket", "_ssl", "_multiprocessing"}
    path_events = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
                   "os.link": (0, 1), "os.symlink": (1,), "os.truncate": (0,), "os.chmod": (0,),
                   "os.chown": (0,), "os.utime": (0,), "os.chflags": (0,), "os.lchflags": (0,),
                   "os.setxattr": (0,), "os.removexattr": (0,), "shutil.copyfile": (1,),
                   "shutil.copymode": (1,), "shutil.copystat": (1,), "shutil.copytree": (1,),
                   "shutil.rmtree": (0,), "shutil.move": (0, 1)}
    violations = []
    busy = [False]

    def under(path, roots):
        p = real(os.fsdecode(path))
        return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)

    def refuse(what):
        violations.append(what[:200])
        raise PermissionError("sandbox: " + what + " is not allowed")

    def hook(event, args):
        if busy[0]:
            return
        busy[0] = True
        try:
            if event.startswith(blocked):
                refuse(event)
            elif event == "import" and args[0] in bad_imports:
                refuse("import " + args[0])
            elif event == "open" and not isinstance(args[0], int):
                path, m, flags = args[0], args[1], args[2] or 0
                writing = any(c in m for c in "wax+") if isinstance(m, str) else bool(
                    flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC))
                if writing and not under(path, (work,)):
                    refuse("writing " + os.fsdecode(path))
                if not under(path, read_roots):
                    refuse("reading " + os.fsdecode(path))
                if m is None and os.path.isdir(path) and not under(path, (work,)):
                    refuse("opening directory " + os.fsdecode(path))
            elif event in path_events:
                for i in path_events[event]:
                    if i < len(args) and isinstance(args[i], (str, bytes, os.PathLike)) and not under(args[i], (work,)):
                        refuse(event + " " + os.fsdecode(args[i]))
        finally:
            busy[0] = False

    def emit(result):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        result["violations"] = violations
        result["unenforced"] = unenforced
        data = (nonce + json.dumps(result) + "\n").encode()
        while data:
            data = data[os.write(1, data):]
        os._exit(0)

    sys.addaudithook(hook)
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        code = compile(req["program"], "<program>", "exec")
    except (SyntaxError, ValueError) as e:
        emit({"status": "error", "type": "SyntaxError", "msg": str(e)})
    try:
        exec(code, ns)
        values = None
        if mode == "asserts":
            exec(compile(req["tests"], "<tests>", "exec"), ns)
        elif mode == "calls":
            values = []
            for call in req["calls"]:
                try:
                    v = eval(call, ns)
                    json.dumps(v)
                    values.append({"value": v})
                except MemoryError:
                    raise
                except Exception as e:
                    values.append({"raised": type(e).__name__ + ": " + str(e)[:200]})
        emit({"status": "ok", "values": values})
    except BaseException as e:
        emit({"status": "error", "type": type(e).__name__, "msg": str(e)[:500]})
_main()
'''

_ERROR_OF_TYPE = {"MemoryError": "memory", "SyntaxError": "syntax", "IndentationError": "syntax",
                  "TabError": "syntax", "SystemExit": "exit", "KeyboardInterrupt": "exit"}


def run_python(program: str, *, calls: Sequence[str] | None = None, tests: str | None = None,
               limits: Limits = Limits()) -> RunResult:
    """Run `program`, then (optionally) evaluate each expression in `calls` or exec `tests`, in a sandboxed child.
    Only one of calls/tests may be given. See the module docstring for what is and is not contained."""
    if calls is not None and tests is not None:
        raise ValueError("run_python: give calls or tests, not both")
    mode = "calls" if calls is not None else "asserts" if tests is not None else "run"
    cpu = limits.cpu_s if limits.cpu_s is not None else math.ceil(limits.timeout_s) + 1
    mb = 1024 * 1024
    rlimits = [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_AS", limits.memory_mb * mb, limits.memory_mb * mb),
               ("RLIMIT_FSIZE", limits.file_mb * mb, limits.file_mb * mb), ("RLIMIT_NPROC", 0, 0),
               ("RLIMIT_NOFILE", limits.open_files, limits.open_files), ("RLIMIT_CORE", 0, 0)]
    nonce = f"@@result-{secrets.token_hex(8)}@@"
    request = json.dumps({"nonce": nonce, "mode": mode, "program": program, "calls": list(calls or []),
                          "tests": tests or "", "rlimits": rlimits}).encode()
    work = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
    start = time.monotonic()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", _RUNNER], cwd=work, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, close_fds=True)
        try:
            out, err, killed = _communicate(proc, request, start + limits.timeout_s, limits.output_bytes)
        finally:
            _kill_group(proc)
        return _classify(proc.returncode, out, err, killed, nonce, limits, time.monotonic() - start)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _communicate(proc: subprocess.Popen, request: bytes, deadline: float, cap: int
                 ) -> tuple[bytes, bytes, str | None]:
    """Send the request, read stdout/stderr until EOF, the deadline, or more than `cap` bytes in total."""
    try:
        proc.stdin.write(request)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass  # the child died before reading; its exit status tells why
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    killed = None
    try:
        while sel.get_map() and killed is None:
            left = deadline - time.monotonic()
            if left <= 0:
                killed = "timeout"
                break
            for key, _ in sel.select(left):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    continue
                bufs[key.fd] += data
                if sum(map(len, bufs.values())) > cap:
                    killed = "output_limit"
                    break
        if killed is None:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed = "timeout"  # closed its pipes but kept running
    finally:
        sel.close()
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), killed


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session, so pgid == pid
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        f.close()


def _classify(rc: int | None, out: bytes, err: bytes, killed: str | None, nonce: str, limits: Limits,
              elapsed: float) -> RunResult:
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    result: dict[str, Any] | None = None
    cut = stdout.rfind(nonce)
    if cut >= 0:
        line = stdout[cut + len(nonce):].split("\n", 1)[0]
        stdout = stdout[:cut]
        try:
            result = json.loads(line)
        except ValueError:
            result = None
    common = {"stdout": stdout[-2000:], "stderr": stderr[-2000:], "returncode": rc, "elapsed_s": elapsed}
    violations = list(result.get("violations", [])) if result else []
    common["violations"] = violations
    common["unenforced"] = list(result.get("unenforced", [])) if result else []
    if killed == "output_limit":
        return RunResult("output_limit", f"more than {limits.output_bytes} bytes of output", **common)
    if killed == "timeout":
        return RunResult("timeout", f"still running after {limits.timeout_s:g}s wall clock", **common)
    if violations:
        return RunResult("forbidden", "; ".join(violations[:5]), **common)
    if rc is not None and rc < 0:
        sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        reason = {"SIGXCPU": "timeout", "SIGXFSZ": "file_limit"}.get(sig, "crash")
        return RunResult(reason, f"killed by {sig}", **common)
    if result is None:
        return RunResult("no_result", f"exited with code {rc} before reporting (sys.exit/os._exit?)", **common)
    if result.get("status") != "ok":
        kind = result.get("type", "")
        reason = _ERROR_OF_TYPE.get(kind, "exception")
        return RunResult(reason, f"{kind}: {result.get('msg', '')}", **common)
    return RunResult(None, "", values=result.get("values"), **common)


def same_value(got: Any, want: Any) -> bool:
    """Strict JSON-level equality: bools are not ints, floats compare with a relative tolerance of 1e-9."""
    if isinstance(want, bool) or isinstance(got, bool):
        return type(got) is type(want) and got == want
    if isinstance(want, int | float) and isinstance(got, int | float):
        if isinstance(want, float) or isinstance(got, float):
            return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
        return got == want
    if isinstance(want, list | tuple) and isinstance(got, list | tuple):
        return len(got) == len(want) and all(same_value(g, w) for g, w in zip(got, want))
    if isinstance(want, dict) and isinstance(got, dict):
        return got.keys() == want.keys() and all(same_value(got[k], want[k]) for k in want)
    return type(got) is type(want) and got == want


def _failure(result: RunResult) -> Score:
    return Score(0.0, False, {"error": result.error, "detail": result.detail[:300], "stderr": result.stderr[-300:]})


def check_function(program: str, cases: Sequence[tuple[str, Any]], limits: Limits = Limits()) -> Score:
    """1.0 when every call expression evaluates (in the program's namespace) to its expected JSON value.

    The expected values stay in this process: the child only reports what it computed, so it cannot
    fake a pass without computing the right values."""
    result = run_python(program, calls=[call for call, _ in cases], limits=limits)
    if not result.ok:
        return _failure(result)
    values = result.values or []
    for i, ((call, want), got) in enumerate(zip(cases, values)):
        if "raised" in got:
            return Score(0.0, False, {"failed": call, "raised": got["raised"], "passed": i})
        if not same_value(got["value"], json.loads(json.dumps(want))):
            return Score(0.0, False, {"failed": call, "got": repr(got["value"])[:100], "passed": i})
    if len(values) != len(cases):
        return Score(0.0, False, {"error": "no_result", "detail": f"{len(values)} of {len(cases)} results"})
    return Score(1.0, True, {"passed": len(cases)})


def run_asserts(program: str, tests: str, limits: Limits = Limits()) -> Score:
    """1.0 when the program followed by the assert-style `tests` runs cleanly. Weaker than check_function
    against a hostile program (see the module docstring); fine for honest mistakes."""
    result = run_python(program, tests=tests, limits=limits)
    if result.ok:
        return Score(1.0, True, {})
    if result.error == "exception" and result.detail.startswith("AssertionError"):
        return Score(0.0, False, {"failed": "assert", "detail": result.detail[:300]})
    return _failure(result)
