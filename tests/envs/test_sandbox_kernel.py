"""The sandbox's kernel layers, tested as if the audit hook were already defeated.

Each program here runs in the real sandbox (the same bwrap command line, root launcher, namespace filter, limits
and runner filter as `run_python`) but with no audit hook at all, with ctypes in hand: what a program that
switched the hook off could do. CI runs as root, so these are the root case; `test_a_non_root_trainer_...`
repeats the central checks with the trainer itself running as an unprivileged user.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from envs_helpers import runner_processes, settled

from posttrain.envs import bwrap, sandbox, seccomp

pytestmark = pytest.mark.skipif(not bwrap.available()[0], reason=f"no bubblewrap here: {bwrap.available()[1]}")
x86_only = pytest.mark.skipif(not seccomp.supported(), reason="the seccomp filters are x86-64 only")

PRELUDE = r'''
import ctypes, errno, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def sys_call(nr, *args):
    """'ok' or the errno name of a raw system call."""
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return "ok" if r >= 0 else errno.errorcode[ctypes.get_errno()]
'''


def raw_command(body: str, report_w: int, seccomp_fd: int | None, tmp_mb: int = 8) -> list[str]:
    """The sandbox's own command line running `body` after the runner's confinement but without its hook."""
    definitions = sandbox._RUNNER.replace("\n_main()\n", "\n")
    runner_filter = seccomp.runner_filter(report_w)
    confine = (f"import resource\nfor _n, _s, _h in {[('RLIMIT_AS', 512 << 20, 512 << 20), ('RLIMIT_NPROC', 0, 0)]!r}:"
               "\n    resource.setrlimit(getattr(resource, _n), (_s, _h))\n"
               + (f"install_seccomp(bytes.fromhex({runner_filter.hex()!r}))\n" if runner_filter else ""))
    program = definitions + confine + PRELUDE + body
    return [*bwrap.argv(bwrap.bwrap_binary(), tmp_mb=tmp_mb, seccomp_fd=seccomp_fd),
            os.path.realpath(sys.executable), "-I", "-S", "-c", program]


def raw(body: str, tmp_mb: int = 8) -> dict:
    """Run `body` (which prints one JSON object last) in the hook-less sandbox; that object."""
    report_r, report_w = os.pipe()
    bpf = seccomp.namespace_filter()
    filter_r = None
    if bpf is not None:
        filter_r, w = os.pipe()
        os.write(w, bpf)
        os.close(w)
    try:
        cmd = raw_command(body, report_w, filter_r, tmp_mb)
        fds = (report_w,) if filter_r is None else (report_w, filter_r)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, pass_fds=fds, check=False)
    finally:
        for fd in (report_r, report_w, filter_r):
            if fd is not None:
                os.close(fd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_program_runs_as_an_unprivileged_host_uid():
    token = secrets.token_hex(8)
    report_r, report_w = os.pipe()
    cmd = raw_command(f"import time\nprint('ready', flush=True)\ntime.sleep(30)  # {token}\n", report_w, None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, pass_fds=(report_w,))
    try:
        assert proc.stdout.readline().strip() == b"ready"
        uids = []
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and token.encode() in (d / "cmdline").read_bytes() \
                        and (d / "comm").read_text().startswith("python"):
                    status = (d / "status").read_text().splitlines()
                    uids.append([line for line in status if line.startswith(("Uid:", "Gid:", "Groups:"))])
            except OSError:
                continue
    finally:
        proc.kill()
        proc.wait()
        os.close(report_r)
        os.close(report_w)
    expected = sandbox_host_uid()
    assert uids, "the sandboxed process was not found"
    for uid_line, gid_line, groups_line in uids:
        assert uid_line.split()[1:] == [str(expected)] * 4, uid_line
        assert "0" not in gid_line.split()[1:], gid_line
        assert groups_line.split()[1:] in ([], [str(expected)]), groups_line


def sandbox_host_uid() -> int:
    return bwrap.SANDBOX_UID if os.geteuid() == 0 else os.geteuid()


def test_no_sysctl_or_host_procfs_file_can_be_written_and_root_only_files_cannot_be_read():
    found = raw(r'''
writable = []
for root in ["/proc/sys", "/proc"]:
    for top, dirs, files in os.walk(root):
        if top == "/proc":
            dirs[:] = [d for d in dirs if not d.isdigit() and d not in ("self", "thread-self")]
        for f in files:
            p = os.path.join(top, f)
            try:
                os.close(os.open(p, os.O_WRONLY))
                writable.append(p)
            except OSError:
                pass
readable = []
for p in ["/proc/keys", "/proc/key-users", "/proc/timer_list", "/proc/kallsyms", "/proc/kmsg", "/proc/slabinfo"]:
    try:
        with open(p) as fh:
            if fh.read(1):
                readable.append(p)
    except OSError:
        pass
own = []
for p in ["/proc/self/oom_score_adj", "/proc/self/comm", "/proc/self/attr/current"]:
    try:
        os.close(os.open(p, os.O_WRONLY)); own.append(p)
    except OSError:
        pass
print(json.dumps({"writable": writable, "readable": readable, "own": own, "sys": os.path.exists("/sys/kernel")}))
''')
    assert found["writable"] == [], found["writable"][:10]
    assert found["readable"] == []
    assert found["own"] == []
    assert found["sys"] is False


@x86_only
def test_no_new_process_thread_program_or_namespace():
    found = raw(r'''
CLONE_NEW = {"user": 0x10000000, "mount": 0x00020000, "net": 0x40000000, "pid": 0x20000000, "ipc": 0x08000000,
             "uts": 0x04000000, "cgroup": 0x02000000}
out = {"fork": sys_call(57), "clone": sys_call(56, 17, 0, 0, 0, 0), "clone3": sys_call(435, 0, 0)}
for name, flag in CLONE_NEW.items():
    out["clone " + name] = sys_call(56, flag | 17, 0, 0, 0, 0)
    out["unshare " + name] = sys_call(272, flag)
out["setns"] = sys_call(308, 0, 0)
with open("/tmp/run.sh", "w") as fh:
    fh.write("#!/bin/sh\necho escaped\n")
os.chmod("/tmp/run.sh", 0o755)
out["execve /tmp"] = sys_call(59, b"/tmp/run.sh", 0, 0)
out["execve /usr"] = sys_call(59, b"/usr/bin/true", 0, 0)
out["execveat"] = sys_call(322, -100, b"/usr/bin/true", 0, 0, 0)
try:
    import threading
    threading.Thread(target=print).start()
    out["thread"] = "ok"
except RuntimeError:
    out["thread"] = "refused"
forks = 0
for _ in range(48):
    try:
        if os.fork() == 0:
            os._exit(0)
        forks += 1
    except OSError:
        pass
out["forks"] = forks
print(json.dumps(out))
''')
    assert found.pop("forks") == 0
    assert found.pop("thread") == "refused"
    assert found.pop("clone3") == "ENOSYS", "clone3 must be ENOSYS so that a libc falls back to clone"
    assert {k: v for k, v in found.items() if v != "EPERM"} == {}


@x86_only
def test_kernel_attack_surface_is_refused():
    found = raw(r'''
calls = {"keyctl": (250, 0, 0), "add_key": (248, b"user", b"x", b"y", 1, -2), "request_key": (249, b"user", b"x", 0, 0),
         "userfaultfd": (323, 0), "perf_event_open": (298, 0, 0, -1, -1, 0), "io_uring_setup": (425, 1, 0),
         "io_uring_enter": (426, 0, 0, 0, 0, 0), "io_uring_register": (427, 0, 0, 0, 0),
         "bpf": (321, 0, 0, 0), "memfd_create": (319, b"x", 0),
         "memfd_secret": (447, 0), "ptrace": (101, 16, 1, 0, 0), "process_vm_readv": (310, 1, 0, 0, 0, 0, 0),
         "pidfd_open": (434, 1, 0), "pidfd_send_signal": (424, 0, 9, 0, 0), "open_by_handle_at": (304, -100, 0, 0),
         "mount": (165, b"none", b"/tmp", b"tmpfs", 0, 0), "fsopen": (430, b"tmpfs", 0), "open_tree": (428, -100, b"/", 0),
         "init_module": (175, 0, 0, 0), "kexec_load": (246, 0, 0, 0, 0), "chroot": (161, b"/tmp"),
         "sethostname": (170, b"x", 1), "syslog": (103, 3, 0, 0), "kcmp": (312, 1, 1, 0, 0, 0)}
out = {name: sys_call(*args) for name, args in calls.items()}
out["/dev"] = sorted(os.listdir("/dev"))
print(json.dumps(out))
''')
    devices = found.pop("/dev")
    assert {k: v for k, v in found.items() if v != "EPERM"} == {}
    assert set(devices) <= {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "fd", "stdin",
                            "stdout", "stderr", "core", "console"}, devices


def test_memory_disk_and_tmp_hold():
    found = raw(r'''
out = {}
try:
    blob = bytearray(1 << 30)
    out["1 GiB"] = "allocated"
except MemoryError:
    out["1 GiB"] = "MemoryError"
written = 0
try:
    with open("/tmp/fill", "wb") as fh:
        for _ in range(64):
            fh.write(b"x" * (1 << 20)); fh.flush(); written += 1
except OSError:
    pass
out["tmp MiB"] = written
flags = [line.split()[3] for line in open("/proc/self/mounts") if line.split()[1] == "/tmp"][0].split(",")
out["tmp flags"] = flags
print(json.dumps(out))
''', tmp_mb=8)
    assert found["1 GiB"] == "MemoryError"
    assert found["tmp MiB"] <= 8
    assert {"nosuid", "nodev"} <= set(found["tmp flags"])


def test_the_runner_confines_itself_before_the_program_starts():
    """The same checks through run_python (the hook in place): a program cannot fork, thread or exec, and the
    limits the runner could not set are reported, not silently dropped."""
    for mode in ("bwrap", "weak"):
        limits = sandbox.Limits(sandbox=mode)
        r = sandbox.run_python("import os\nprint(os.getpid())", limits=limits)
        assert r.ok, r
        if seccomp.supported():
            assert not [u for u in r.unenforced if u.startswith("seccomp")], r.unenforced
        for program in ["import os\nos.fork()", "import threading\nthreading.Thread(target=print).start()",
                        "import os\nos.execv('/usr/bin/true', ['true'])"]:
            assert not sandbox.run_python(program, limits=limits).ok, (mode, program)


@pytest.mark.skipif(os.geteuid() != 0, reason="the trainer already runs unprivileged here")
def test_a_non_root_trainer_gets_the_same_sandbox():
    """The trainer itself run as nobody (through the same launcher that drops root for bwrap): the honest program
    passes, and a fork and a sysctl write stay refused."""
    script = ("import json, os\nfrom posttrain.envs.sandbox import check_function, run_python\n"
              "out = {'uid': os.geteuid()}\n"
              "out['honest'] = check_function('def f(x):\\n    return 2 * x', [('f(3)', 6)]).reward\n"
              "out['fork'] = run_python('import os\\nos.fork()').error\n"
              "out['sysctl'] = run_python(\"open('/proc/sys/kernel/hostname', 'w').write('x')\").error\n"
              "print(json.dumps(out))\n")
    launcher = (Path(bwrap.__file__).with_name("_bwrap_launcher.py")).read_text()
    spec = bwrap._drop_root_prefix()[-1]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", launcher, spec, sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=300, env=env, cwd="/", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"uid": bwrap.SANDBOX_UID, "honest": 1.0, "fork": "forbidden", "sysctl": "forbidden"}, out


def test_a_run_cut_at_its_time_limit_leaves_no_process_behind():
    r = sandbox.run_python("import time\ntime.sleep(60)", limits=sandbox.Limits(timeout_s=1))
    assert r.error == "timeout"
    assert settled(runner_processes, within_s=10) == []
