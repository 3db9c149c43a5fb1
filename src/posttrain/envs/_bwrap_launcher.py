"""Runs bwrap as an unprivileged host user when the trainer is root: `python -I -S -c <this file> SPEC BWRAP...`.

Run as root, bubblewrap maps the sandbox's uid onto host uid 0: no capabilities, but the kernel's own uid checks
(sysctls, root-owned procfs files, RLIMIT_NPROC) see root. So this launcher drops to uid/gid 65534 (nobody), with
no supplementary groups, and execs bwrap, which then builds its user namespace as nobody: the sandbox's uid is
host nobody. Its only other job is to keep the Python installation visible to that user when it lives under a
directory nobody may enter (pyenv in /root): in a private mount namespace of its own it covers each such
directory (SPEC "covers") with an empty tmpfs and binds the Python directories (SPEC "dirs") back at their own
paths, so bwrap can --ro-bind them. The host's mounts are not touched. Standard library only; it runs nothing
of the program's.
"""
import ctypes
import json
import os
import sys

CLONE_NEWNS, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 0x20000, 0x2, 0x4, 0x8, 0x1000, 0x4000, \
    0x40000
NOBODY = 65534


def main() -> None:
    spec, bwrap_argv = json.loads(sys.argv[1]), sys.argv[2:]
    # opened while still root: nobody may not be able to reach it by path (a venv under /root)
    bwrap_fd = os.open(bwrap_argv[0], os.O_RDONLY | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            sys.stderr.write(f"sandbox launcher: {what}: {os.strerror(ctypes.get_errno())}\n")
            os._exit(126)

    if spec["covers"]:
        check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
        # opened after the unshare: a bind's source must be a mount of this namespace
        keep = [(os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), d) for d in spec["dirs"]]
        for cover in spec["covers"]:
            check(libc.mount(b"tmpfs", cover.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                             b"mode=0755,size=64k"), f"covering {cover}")
        for fd, d in keep:
            os.makedirs(d, mode=0o755, exist_ok=True)
            check(libc.mount(f"/proc/self/fd/{fd}".encode(), d.encode(), None, MS_BIND | MS_REC, None),
                  f"binding {d}")
            os.close(fd)
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    if os.getresuid() != (NOBODY,) * 3 or os.getgroups():
        sys.stderr.write("sandbox launcher: could not drop root\n")
        os._exit(126)
    os.execve(bwrap_fd, bwrap_argv, os.environ)


main()
