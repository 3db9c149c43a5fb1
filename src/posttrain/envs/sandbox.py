"""Run model-written Python in an isolated, limited process and check it against tests.

    result = run_python("def f(x):\\n    return 2*x", calls=["f(3)"])         # RunResult, values == [{"value": 6}]
    score = check_function(program, [("f(3)", 6), ("f(0)", 0)])                # Score: 1.0 only if every case matches
    score = run_asserts(program, "assert f(3) == 6")                           # Score, assert-style tests

RL optimises against whatever the verifier rewards, so a program is assumed hostile. What contains it, layer by
layer (docs/reliability.md says what each stops and what none of them does):

  namespaces  (sandbox="bwrap", the default) bubblewrap puts the program in fresh user, pid, net, mount, ipc, uts
              and cgroup namespaces as uid 65534 with no capabilities, and that uid is an unprivileged host uid
              even when the trainer is root (host nobody; envs/bwrap.py): it sees a read-only /usr and Python
              installation, its own read-only /proc (host-wide and root-only files covered), a read-only minimal
              /dev and a private tmpfs at /tmp (Limits.tmp_mb) as its only writable place. No project, no home, no
              run directories, no other process, no network. A seccomp filter refuses memfd, pidfd, ptrace, mount,
              keyrings, bpf, perf, io_uring, userfaultfd, nested namespaces (unshare, setns, clone flags) and
              similar (envs/seccomp.py). Killing the sandbox's init at the end kills everything inside.
  process     a fresh `python -I -S -B` (no environment variables honoured, no site-packages, no .pyc writes),
              its own session; on timeout, too much output, and after every run the whole group and the
              namespace's init are SIGKILLed, and the call returns only once every process of it is gone.
  limits      set by the runner before any program byte is compiled, so the program cannot raise them: wall clock
              (parent-enforced), CPU seconds, address space, file size, open files, no core dumps; then a second
              seccomp filter the runner puts on itself (in the weak sandbox too): no fork, clone or exec at all, so
              no process or thread whatever the uid (RLIMIT_NPROC is not enforced for root's user) and nothing
              written to /tmp can be run.
  output      stdout + stderr are read at most Limits.output_bytes; beyond that the group is killed.
  audit hook  defence in depth only (PEP 578 hooks are no boundary): refuses fork / exec / subprocess / signals /
              sockets / ctypes and file access outside the work dir. Every refusal is written at once to a report
              channel the program cannot close or replace (seccomp), and a run with one scores 0 with error
              "forbidden" even if the program caught the error. The hook has no closure and reads no global name:
              everything it uses is an immutable default or a C function captured before the program ran, and
              replacing a function's code or defaults is refused (envs/_sandbox_runner.py says why each matters).

sandbox="weak" drops the namespaces (for machines without them: macOS, some containers): then only the process,
limits (with the runner's seccomp filter on Linux x86-64), output cap and audit hook remain, the program runs with
the trainer's uid and can read what it can read if it gets past the hook.
It must be chosen by name (the code environment's `sandbox` argument) and the run log says so.

The expected values of check_function never enter the child, which only returns JSON of the values it computed;
run_asserts runs the tests in the program's own interpreter (a hostile program can make its own asserts pass).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.envs import bwrap, seccomp
from posttrain.records import Score

SANDBOXES = ("bwrap", "weak")


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0  # wall clock, parent-enforced
    cpu_s: int | None = None  # RLIMIT_CPU; None = ceil(timeout_s) + 1
    memory_mb: int = 512  # RLIMIT_AS
    output_bytes: int = 256 * 1024  # stdout + stderr read at most this much
    file_mb: int = 16  # RLIMIT_FSIZE
    open_files: int = 64  # RLIMIT_NOFILE
    tmp_mb: int = 64  # the sandbox's writable tmpfs, all files together (bwrap)
    sandbox: str = "bwrap"  # "bwrap" (namespaces + seccomp) or "weak" (process, limits and audit hook only)

    def __post_init__(self) -> None:
        if self.sandbox not in SANDBOXES:
            raise ValueError(f"sandbox must be one of {SANDBOXES}, got {self.sandbox!r}")


def environment_limits(env: str, *, timeout_s: float, memory_mb: int, sandbox: str) -> tuple[Limits, str | None]:
    """An environment's sandbox limits and the warning its run log carries (None for bwrap). bwrap must be
    usable here: otherwise a ValueError naming the fallback a user may choose by name ("weak")."""
    limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb, sandbox=sandbox)
    if sandbox == "bwrap":
        ok, why = bwrap.available()
        if not ok:
            raise ValueError(f"{env}: the code sandbox needs bubblewrap: {why}; where namespaces cannot be had, "
                             "choose the weaker sandbox by name: sandbox = \"weak\"")
        return limits, None
    return limits, (f"{env}: sandbox = \"weak\": model-written programs run WITHOUT namespaces (same uid as the "
                    "trainer, its files readable); only rlimits and an audit hook contain them")


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


# The program side, run with `python -I -S -B -c`: a file of its own so that it reads as code (and is linted).
_RUNNER = (Path(__file__).with_name("_sandbox_runner.py")).read_text()

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
    start = time.monotonic()
    report_r, report_w = os.pipe()
    try:
        runner_filter = seccomp.runner_filter(report_w)
        request = json.dumps({"mode": mode, "program": program, "calls": list(calls or []), "tests": tests or "",
                              "rlimits": rlimits, "report_fd": report_w,
                              "seccomp": runner_filter.hex() if runner_filter else ""}).encode()
        with _child(limits) as (argv, cwd, env, pass_fds, info_fd):
            proc = subprocess.Popen([*argv, os.path.realpath(sys.executable), "-I", "-S", "-B", "-c", _RUNNER],
                                    cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                                    pass_fds=(*pass_fds, report_w))
            os.close(report_w)
            report_w = -1
            try:
                out, err, report, killed = _communicate(proc, request, report_r, start + limits.timeout_s,
                                                        limits.output_bytes)
            finally:
                _kill_group(proc, info_fd)
    finally:
        os.close(report_r)
        if report_w >= 0:
            os.close(report_w)
    return _classify(proc.returncode, out, err, report, killed, limits, time.monotonic() - start)


class SandboxUnavailable(RuntimeError):
    """The OS sandbox cannot be built here; the message says why and how to fix it."""


@contextlib.contextmanager
def _child(limits: Limits):
    """-> (command prefix, cwd, environment, fds to pass, where bwrap reports its pid namespace's init or None)
    for one sandboxed child; cleans up after it."""
    if limits.sandbox == "weak":
        work = tempfile.mkdtemp(prefix="posttrain-sandbox-")
        try:
            yield [], work, {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}, (), None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    ok, why = bwrap.available()
    if not ok:
        raise SandboxUnavailable(f"the code sandbox needs bubblewrap: {why}. Where namespaces cannot be had, "
                                 "choose the weaker sandbox by name: env.args.sandbox = \"weak\"")
    bpf = seccomp.namespace_filter()
    opened: list[int] = []
    try:
        filter_fd = None
        if bpf is not None:
            filter_fd, write_fd = os.pipe()
            opened.append(filter_fd)
            os.write(write_fd, bpf)  # about a kilobyte: fits the pipe buffer
            os.close(write_fd)  # bwrap reads the filter to EOF
        info_r, info_w = os.pipe()
        opened += [info_r, info_w]
        pass_fds = (info_w,) if filter_fd is None else (filter_fd, info_w)
        yield (bwrap.argv(bwrap.bwrap_binary(), tmp_mb=limits.tmp_mb, seccomp_fd=filter_fd, info_fd=info_w), "/",
               {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, pass_fds, info_r)
    finally:
        for fd in opened:
            os.close(fd)


def _communicate(proc: subprocess.Popen, request: bytes, report_fd: int, deadline: float, cap: int
                 ) -> tuple[bytes, bytes, bytes, str | None]:
    """Send the request, read stdout, stderr and the report channel until EOF, the deadline, or more than `cap`
    bytes of output (the report may hold the result's values on top: 4 x cap)."""
    try:
        proc.stdin.write(request)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass  # the child died before reading; its exit status tells why
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), report_fd: bytearray()}
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
                if len(bufs[report_fd]) > 4 * cap or len(bufs[proc.stdout.fileno()]) + len(
                        bufs[proc.stderr.fileno()]) > cap:
                    killed = "output_limit"
                    break
        if killed is None:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed = "timeout"  # closed its pipes but kept running
    finally:
        sel.close()
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), bytes(bufs[report_fd]), killed


def _kill_group(proc: subprocess.Popen, info_fd: int | None) -> None:
    """SIGKILL the child's process group and, under bwrap, its pid namespace's init; return once every process of
    the sandbox is gone (the init's exit waits for the whole namespace, so a pidfd on it says when)."""
    init = _sandbox_init(proc, info_fd)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session, so pgid == pid
    except (ProcessLookupError, PermissionError):
        pass
    if init is not None:
        try:
            signal.pidfd_send_signal(init, signal.SIGKILL)
            select.select([init], [], [], 30.0)
        except OSError:
            pass  # already gone
        finally:
            os.close(init)
    proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        f.close()


def _sandbox_init(proc: subprocess.Popen, info_fd: int | None) -> int | None:
    """A pidfd on the bwrap child that bwrap reported on `info_fd`, if it is still bwrap's child (checked while
    bwrap lives, so the pid cannot have been reused by another process)."""
    if info_fd is None:
        return None
    os.set_blocking(info_fd, False)
    try:
        found = re.search(rb'"child-pid":\s*(\d+)', os.read(info_fd, 4096))  # JSON, perhaps not yet complete
        pidfd = os.pidfd_open(int(found.group(1)))
        pid = int(found.group(1))
    except (OSError, AttributeError):
        return None  # bwrap never got that far, or the child is gone
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            parent = int(fh.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        parent = -1
    if parent != proc.pid:
        os.close(pidfd)
        return None
    return pidfd


def _read_report(report: bytes) -> tuple[list[str], dict[str, Any] | None]:
    """(every refused operation, the last result) from the report channel. A line that is neither a `V` nor a
    well-formed `R` line was not written by the runner: it counts as a violation (the channel was tampered with)."""
    violations: list[str] = []
    result = None
    for line in report.split(b"\n")[:-1] if report.endswith(b"\n") else report.split(b"\n"):
        if line.startswith(b"V "):
            violations.append(line[2:].decode("utf-8", "replace")[:200])
            continue
        try:
            parsed = json.loads(line[2:]) if line.startswith(b"R ") else None
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            result = parsed
        elif line:
            violations.append("a report line the runner did not write")
    return violations, result


def _classify(rc: int | None, out: bytes, err: bytes, report: bytes, killed: str | None, limits: Limits,
              elapsed: float) -> RunResult:
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    violations, result = _read_report(report)
    common = {"stdout": stdout[-2000:], "stderr": stderr[-2000:], "returncode": rc, "elapsed_s": elapsed,
              "violations": violations,
              "unenforced": [str(u) for u in result.get("unenforced", [])] if result else []}
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
        kind = str(result.get("type", ""))
        reason = _ERROR_OF_TYPE.get(kind, "exception")
        return RunResult(reason, f"{kind}: {result.get('msg', '')}", **common)
    values = result.get("values")
    if values is not None and not (isinstance(values, list) and all(isinstance(v, dict) for v in values)):
        return RunResult("no_result", "a malformed result", **common)
    return RunResult(None, "", values=values, **common)


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
    """A program that fails (syntax, exception, timeout, memory, a refused operation, ...) earns 0: that is the
    verdict on the program, not a failure of the verifier, so it is `program_error`, not `error` (which would
    count against env.max_error_frac and stop a run whose untrained model writes broken code)."""
    return Score(0.0, False, {"program_error": result.error, "detail": result.detail[:300],
                              "stderr": result.stderr[-300:]})


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
        return Score(0.0, False, {"program_error": "no_result", "detail": f"{len(values)} of {len(cases)} results"})
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
