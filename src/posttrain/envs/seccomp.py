"""seccomp filters for the code sandbox, as classic BPF programs (struct sock_filter[]), x86-64 only.

Two filters stack on every sandboxed program (the kernel applies the strictest answer):

  `namespace_filter()` is given to bwrap (`--seccomp FD`) and applies from the program's first instruction: it
      refuses what no program needs and what widens the attack surface of the kernel (ptrace, mount, keyrings,
      bpf, perf, io_uring, userfaultfd, memfd, pidfd, module loading, ...), nested namespaces through `unshare`,
      `setns` and `clone` with a CLONE_NEW* flag, and `clone3` (ENOSYS, so a libc falls back to `clone`, whose
      flags a filter can read; `clone3`'s are behind a pointer).
  `runner_filter(report_fd)` is installed by the sandbox's own runner after the interpreter has started and
      before any program byte is compiled (so in the weak sandbox too): everything above, plus no new process or
      thread at all (fork, vfork, clone, clone3) and no exec (execve, execveat: with no exec, the writable /tmp is
      noexec in effect), and the runner's report channel cannot be closed or replaced (close, dup2 and dup3 onto
      it; close_range refused with ENOSYS so that Python falls back to close()). This is the process-count guard
      that does not rely on RLIMIT_NPROC, which the kernel does not enforce for root's user.

Numbers from arch/x86/entry/syscalls/syscall_64.tbl; the layout of `struct seccomp_data` from
include/uapi/linux/seccomp.h (nr @0, arch @4, args[i] @16 + 8i, little-endian: the low 32 bits first).
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterable

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

# Refused by both filters: nothing a test program needs, each a known kernel attack surface or a way out of a limit.
REFUSED = {
    "ptrace": 101, "syslog": 103, "acct": 163, "pivot_root": 155, "chroot": 161, "mount": 165, "umount2": 166,
    "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172,
    "ioperm": 173, "init_module": 175, "delete_module": 176, "quotactl": 179, "lookup_dcookie": 212,
    "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272, "move_pages": 279,
    "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313,
    "memfd_create": 319, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "pidfd_send_signal": 424,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_open": 434, "pidfd_getfd": 438,
    "mount_setattr": 442, "memfd_secret": 447, "open_tree_attr": 467,
}
CLONE, CLONE3 = 56, 435
# Also refused by the runner's filter: new processes, threads and programs.
NO_NEW_PROCESSES = {"fork": 57, "vfork": 58, "clone": CLONE, "execve": 59, "execveat": 322}
CLOSE, DUP2, DUP3, CLOSE_RANGE = 3, 33, 292, 436
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME (include/uapi/linux/sched.h)
CLONE_NEW_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80

RET_ALLOW, RET_ERRNO, RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
LD_W_ABS, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06


def _ins(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def _arg_low(i: int) -> int:
    return 16 + 8 * i


def _program(refused: Iterable[int], *, enosys: Iterable[int] = (),
             arg_rules: Iterable[tuple[int, int, str, int]] = ()) -> bytes:
    """A filter that answers EPERM to `refused`, ENOSYS to `enosys`, EPERM to each (nr, arg, test, value) where
    the low 32 bits of args[arg] equal `value` (test "eq") or share a bit with it (test "any"), and allows the
    rest; another architecture is killed and the x32 ABI refused."""
    eperm, nosys = RET_ERRNO | errno.EPERM, RET_ERRNO | errno.ENOSYS
    body: list[bytes] = []
    for nr in sorted(set(refused)):
        body += [_ins(JEQ_K, 0, 1, nr), _ins(RET_K, 0, 0, eperm)]
    for nr in sorted(set(enosys)):
        body += [_ins(JEQ_K, 0, 1, nr), _ins(RET_K, 0, 0, nosys)]
    for nr, arg, test, value in arg_rules:
        jump = JEQ_K if test == "eq" else JSET_K
        # nr? -> load the argument, test it, refuse or reload nr for the next rule
        body += [_ins(JEQ_K, 0, 4, nr), _ins(LD_W_ABS, 0, 0, _arg_low(arg)), _ins(jump, 0, 1, value),
                 _ins(RET_K, 0, 0, eperm), _ins(LD_W_ABS, 0, 0, 0)]
    head = [_ins(LD_W_ABS, 0, 0, 4), _ins(JEQ_K, 1, 0, AUDIT_ARCH_X86_64), _ins(RET_K, 0, 0, RET_KILL_PROCESS),
            _ins(LD_W_ABS, 0, 0, 0), _ins(JGE_K, 0, 1, X32_SYSCALL_BIT), _ins(RET_K, 0, 0, eperm)]
    return b"".join([*head, *body, _ins(RET_K, 0, 0, RET_ALLOW)])


def supported() -> bool:
    return os.uname().machine == "x86_64"


def namespace_filter() -> bytes | None:
    """The filter bwrap installs (see the module docstring), or None off x86-64."""
    if not supported():
        return None
    return _program(REFUSED.values(), enosys=[CLONE3], arg_rules=[(CLONE, 0, "any", CLONE_NEW_FLAGS)])


def runner_filter(report_fd: int) -> bytes | None:
    """The filter the runner installs on itself before the program runs, or None off x86-64."""
    if not supported():
        return None
    return _program([*REFUSED.values(), *NO_NEW_PROCESSES.values()], enosys=[CLONE3, CLOSE_RANGE],
                    arg_rules=[(CLOSE, 0, "eq", report_fd), (DUP2, 1, "eq", report_fd), (DUP3, 1, "eq", report_fd)])
