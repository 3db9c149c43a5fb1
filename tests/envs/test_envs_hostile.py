"""Hostile programs against the code sandbox, scored exactly as RL scores them (score_many on the built-in `code`
environment), as root where the machine runs as root.

Every attack is written so that the program returns the RIGHT answer only if the attack worked: a reward of 1.0
would be a reward it did not earn honestly. Each test also checks that nothing outside the sandbox changed, that
no process outlived the program, and (by running at all) that the trainer survived.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import threading
from pathlib import Path

import pytest
from envs_helpers import runner_processes, settled

import posttrain.envs.sandbox as sandbox_module
from posttrain.envs import make_env
from posttrain.envs.bwrap import available
from posttrain.envs.scoring import score_many
from posttrain.records import Task

pytestmark = pytest.mark.skipif(not available()[0], reason=f"no bubblewrap here: {available()[1]}")

SECRET = "posttrain-test-secret-" + secrets.token_hex(8)
TASK = Task(id="double", question="Write f(x) returning x*2.", answer=[("f(3)", 6), ("f(5)", 10)],
            solution="def f(x):\n    return x*2")
# The program defines f as correct only when `won` is True at the end of the attack.
TAIL = "\ndef f(x):\n    return x * 2 if won else -1\n"


def score(program: str, tmp_path: Path):
    env = make_env("code", {})
    return score_many(env, [TASK], [program], timeout_s=20)[0]


@pytest.fixture(autouse=True)
def _host_state(tmp_path, monkeypatch):
    """A fake secret in the trainer's environment, a 0600 decoy file, the package source's hash; all checked
    after the attack."""
    monkeypatch.setenv("POSTTRAIN_FAKE_SECRET", SECRET)
    decoy = tmp_path / "decoy.txt"
    decoy.write_text(SECRET)
    decoy.chmod(0o600)
    package = Path(sandbox_module.__file__)
    before = hashlib.sha256(package.read_bytes()).hexdigest()
    host_tmp = set(os.listdir("/tmp"))
    yield
    assert hashlib.sha256(package.read_bytes()).hexdigest() == before, "the package source changed"
    assert decoy.read_text() == SECRET
    # Another xdist worker's scoring call may own a sandbox directory or runner at this moment; it is gone when
    # that call ends, while what an attack left behind stays.
    new = settled(lambda: {n for n in set(os.listdir("/tmp")) - host_tmp if "pwn" in n or "posttrain-sandbox" in n})
    assert not new, f"files appeared in the host's /tmp: {new}"
    assert settled(runner_processes) == [], "a sandboxed process outlived its scoring call"


ATTACKS = {
    # switch the audit hook off from a frame / a traceback / gc, then do what it forbids (write outside, read the
    # decoy); the hook keeps no flag, and the namespaces hold either way
    "hook flag via frame": (
        "import sys\nwon = False\nf0 = sys._getframe(0)\n"
        "while f0 is not None:\n    for v in f0.f_locals.values():\n"
        "        if isinstance(v, list) and v == [False]:\n            v[0] = True\n    f0 = f0.f_back\n"
        "try:\n    open('{project}/pwn-frame', 'w').write('x')\n    won = True\nexcept Exception:\n    pass\n"),
    "hook closure via gc": (
        "import gc\nwon = False\n"
        "for o in gc.get_objects():\n    if callable(o) and getattr(o, '__name__', '') == 'hook' and o.__closure__:\n"
        "        for c in o.__closure__:\n            try:\n                if isinstance(c.cell_contents, tuple):\n"
        "                    c.cell_contents = ('/',)\n            except Exception:\n                pass\n"
        "try:\n    won = '{secret}' in open('{decoy}').read()\nexcept Exception:\n    pass\n"),
    "hook via traceback frames": (
        "won = False\ntry:\n    1 / 0\nexcept ZeroDivisionError as e:\n    fr = e.__traceback__.tb_frame\n"
        "    while fr is not None:\n        fr.f_locals.get('violations', []).clear() if isinstance("
        "fr.f_locals.get('violations'), list) else None\n        fr = fr.f_back\n"
        "try:\n    won = '{secret}' in open('{decoy}').read()\nexcept Exception:\n    pass\n"),
    "fspath re-entry": (
        "import os\nwon = False\nclass P:\n    def __fspath__(self):\n        return '{decoy}'\n"
        "try:\n    won = '{secret}' in open(P()).read()\nexcept Exception:\n    pass\n"),
    "thread race": (
        "import threading\nwon = False\nhits = []\n"
        "def reader():\n    for _ in range(200):\n        try:\n            hits.append(open('{decoy}').read())\n"
        "        except Exception:\n            pass\n"
        "try:\n    ts = [threading.Thread(target=reader) for _ in range(4)]\n    [t.start() for t in ts]\n"
        "    [t.join() for t in ts]\nexcept Exception:\n    pass\nwon = any('{secret}' in h for h in hits)\n"),
    "pidfd kill of the parent": (
        "import os, signal\nwon = False\n"
        "try:\n    signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)\n    won = True\nexcept Exception:\n"
        "    pass\n"),
    "memfd outside RLIMIT_AS": (
        "import os\nwon = False\n"
        "try:\n    fd = os.memfd_create('x')\n    os.write(fd, b'x' * (300 << 20))\n    won = True\nexcept Exception:\n"
        "    pass\n"),
    "priority raise": (
        "import os\nwon = False\n"
        "try:\n    os.nice(-10)\n    won = True\nexcept Exception:\n    pass\n"
        "try:\n    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))\n    won = True\nexcept Exception:\n"
        "    pass\n"),
    "daemonised grandchild": (
        "import os\nwon = False\n"
        "try:\n    if os.fork() == 0:\n        os.setsid()\n        if os.fork() == 0:\n            import time\n"
        "            time.sleep(600)\n        os._exit(0)\n    won = True\nexcept Exception:\n    pass\n"),
    "fork bomb": (
        "import os\nwon = False\n"
        "try:\n    for _ in range(64):\n        os.fork()\n    won = True\nexcept Exception:\n    pass\n"),
    "write to the package": (
        "won = False\n"
        "try:\n    open('{package}', 'a').write('\\nPWNED = True\\n')\n    won = True\nexcept Exception:\n    pass\n"),
    "write to the project": (
        "won = False\n"
        "try:\n    open('{project}/pwn-project', 'w').write('x')\n    won = True\nexcept Exception:\n    pass\n"),
    "the trainer's environment": (
        "import os\nwon = False\n"
        "for p in ['/proc/%d/environ' % os.getppid(), '/proc/1/environ'] + ['/proc/%s/environ' % d for d in "
        "os.listdir('/proc') if d.isdigit()]:\n    try:\n        won = won or '{secret}' in open(p).read()\n"
        "    except Exception:\n        pass\nwon = won or '{secret}' in str(os.environ)\n"),
    "localhost network": (
        "import socket\nwon = False\n"
        "try:\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    s.sendall(b'pwned')\n"
        "    won = True\nexcept Exception:\n    pass\n"),
    "fill the disk": (
        "import os\nwon = False\nn = 0\n"
        "try:\n    for i in range(100):\n        with open('/tmp/pwn-fill-%d' % i, 'wb') as fh:\n"
        "            fh.write(b'x' * (15 << 20))\n        n += 1\nexcept Exception:\n    pass\nwon = n * 15 > 200\n"),
    "read the decoy": "won = False\ntry:\n    won = '{secret}' in open('{decoy}').read()\nexcept Exception:\n    pass\n",
    "kill the trainer": (
        "import os\nwon = False\n"
        "try:\n    os.kill({trainer}, 9)\n    won = True\nexcept Exception:\n    pass\n"),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_hostile_program_earns_nothing_and_changes_nothing(name, tmp_path):
    received = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.2)

    def accept() -> None:
        try:
            conn, _ = listener.accept()
            received.append(conn.recv(16))
        except OSError:
            pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    project = Path(__file__).resolve().parents[2]
    program = ATTACKS[name].format(secret=SECRET, decoy=tmp_path / "decoy.txt", package=sandbox_module.__file__,
                                   project=project, port=listener.getsockname()[1], trainer=os.getpid()) + TAIL
    s = score(program, tmp_path)
    t.join(timeout=1)
    listener.close()
    assert (s.reward, s.correct) == (0.0, False), (name, s)
    assert received == [], "the program reached a listener on the host"
    assert not (project / "pwn-project").exists()
    assert "error" not in s.info, s.info  # a refused attack is the program's failure, not a verifier error


def test_an_honest_program_still_passes():
    s = score("def f(x):\n    return x * 2\n", Path("."))
    assert (s.reward, s.correct) == (1.0, True)


@pytest.mark.parametrize("name", ["code", "humaneval"])
def test_without_namespaces_the_weaker_sandbox_must_be_chosen_by_name(monkeypatch, name):
    from posttrain.envs import bwrap

    monkeypatch.setattr(bwrap, "available", lambda: (False, "no user namespaces (test)"))
    with pytest.raises(Exception, match=f'{name}.*no user namespaces.*sandbox = "weak"'):
        make_env(name, {})
    env = make_env(name, {"sandbox": "weak"})
    assert env.warning.startswith(name) and "WITHOUT namespaces" in env.warning
