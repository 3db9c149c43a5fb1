"""The audit hook cannot be switched off from inside, and every refusal is recorded where the program cannot erase it.

Run in the weak sandbox (no namespaces) where the hook is the only thing between the program and the trainer's
files, and in the bwrap sandbox too. Each attack tries to neutralise the hook (its closure cells, defaults or
code, found through gc, frames or tracebacks; the library functions it might call; the report channel) and then
reads a 0600 decoy outside the work dir: a passing program would be one the attack helped.
"""

from __future__ import annotations

import dis
import secrets

import pytest

from posttrain.envs import bwrap, sandbox
from posttrain.envs.sandbox import Limits, check_function, run_python

SECRET = "hook-secret-" + secrets.token_hex(8)
MODES = ["weak"] + (["bwrap"] if bwrap.available()[0] else [])

FIND = ("import gc, sys, types\n"
        "targets = [o for o in gc.get_objects() if isinstance(o, types.FunctionType)\n"
        "           and o.__name__ in ('hook', 'resolve', 'path_text', 'under')]\n")
READ = "try:\n    won = won or '{secret}' in open('{decoy}').read()\nexcept Exception:\n    pass\n"
TAIL = "def f(x):\n    return x * 2 if won else -1\n"

ATTACKS = {
    "closure cells": FIND + (
        "for t in targets:\n    for cell in t.__closure__ or ():\n        try:\n"
        "            cell.cell_contents = ('/',) if isinstance(cell.cell_contents, tuple) else cell.cell_contents\n"
        "        except Exception:\n            pass\n"),
    "defaults": FIND + (
        "for t in targets:\n    try:\n        t.__defaults__ = tuple(('/',) if isinstance(d, tuple) else d "
        "for d in t.__defaults__)\n    except Exception:\n        pass\n"),
    "delete defaults": FIND + "for t in targets:\n    try:\n        del t.__defaults__\n    except Exception:\n"
                              "        pass\n",
    "code": FIND + ("for t in targets:\n    try:\n        t.__code__ = (lambda *a, **k: None).__code__\n"
                    "    except Exception:\n        pass\n"),
    "frames": ("import sys\nf0 = sys._getframe(1)\nwhile f0 is not None:\n"
               "    for k, v in list(f0.f_locals.items()):\n"
               "        if isinstance(v, (list, set)):\n            v.clear()\n"
               "        elif isinstance(v, int) and not isinstance(v, bool):\n            f0.f_locals[k] = -1\n"
               "    f0 = f0.f_back\n"),
    "traceback frames": ("try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    fr = e.__traceback__.tb_frame\n"
                         "    while fr is not None:\n        for v in list(fr.f_locals.values()):\n"
                         "            if isinstance(v, list):\n                v.clear()\n        fr = fr.f_back\n"),
    # every list, set and dict the hook's functions refer to, except the runner's globals and builtins (clearing
    # those breaks the program's own next line, not the hook)
    "gc referents": FIND + (
        "for t in targets:\n    for r in gc.get_referents(t):\n        if isinstance(r, (list, set)):\n"
        "            r.clear()\n        elif isinstance(r, dict) and '_main' not in r and 'open' not in r:\n            r.clear()\n"),
    "patched library": (
        "import builtins, os, posixpath, genericpath, stat\n"
        "os.path.realpath = posixpath.realpath = lambda p, *a, **k: '/tmp'\n"
        "os.fsdecode = lambda p: '/tmp/x'\nos.stat = os.lstat = lambda *a, **k: os.stat_result((0,) * 10)\n"
        "genericpath.isdir = os.path.isdir = lambda p: False\nstat.S_ISLNK = lambda m: False\n"
        "builtins.isinstance = lambda *a: True\nbuiltins.any = lambda *a: False\n"
        "builtins.len = lambda *a: 0\nbuiltins.type = lambda *a: str\n"),
    "patched pathlib": (
        "import pathlib\np = pathlib.Path('ok.txt')\nstr(p)\n"
        "pathlib.PurePath.__fspath__ = lambda self: '{decoy}'\n"
        "won = False\ntry:\n    won = '{secret}' in open(p).read()\nexcept Exception:\n    pass\n"),
    "patched pathlib slot": (
        "import pathlib\nreal = pathlib.PurePath.__dict__['_str']\n"
        "pathlib.PurePath._str = property(lambda self: '{decoy}')\np = pathlib.Path('ok.txt')\n"
        "won = False\ntry:\n    won = '{secret}' in open(p).read()\nexcept Exception:\n    pass\n"),
    "str subclass path": (
        "class P(str):\n    def startswith(self, *a):\n        return True\n"
        "won = False\ntry:\n    won = '{secret}' in open(P('{decoy}')).read()\nexcept Exception:\n    pass\n"),
    "fspath re-entry": (
        "class P:\n    n = 0\n    def __fspath__(self):\n        P.n += 1\n"
        "        return 'ok.txt' if P.n % 2 else '{decoy}'\n"
        "won = False\ntry:\n    won = '{secret}' in open(P()).read()\nexcept Exception:\n    pass\n"),
    "ctypes import": ("won = False\ntry:\n    import ctypes\n    ctypes.CDLL(None).getpid()\n    won = True\n"
                      "except Exception:\n    pass\n"),
    "leftover ctypes objects": (
        "import gc\nwon = False\nfor o in gc.get_objects():\n"
        "    if type(o).__name__ in ('CDLL', '_FuncPtr', 'CFunctionType'):\n        try:\n"
        "            o.prctl(38, 0, 0, 0, 0) if type(o).__name__ == 'CDLL' else o()\n            won = True\n"
        "        except Exception:\n            pass\n"),
}


@pytest.fixture()
def decoy(tmp_path):
    path = tmp_path / "decoy.txt"
    path.write_text(SECRET)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_the_hook_cannot_be_switched_off(name, mode, decoy):
    """Every attack ends by reading the decoy, so in the weak sandbox the run must end `forbidden`: the hook was
    still there, and its refusal was recorded."""
    program = ("won = False\n" + ATTACKS[name] + READ + TAIL).format(secret=SECRET, decoy=decoy)
    limits = Limits(timeout_s=20.0, sandbox=mode)
    score = check_function(program, [("f(3)", 6)], limits)
    assert (score.reward, score.correct) == (0.0, False), (name, score)
    result = run_python(program, limits=limits)
    assert SECRET not in result.stdout + result.stderr
    if mode == "weak":  # under bwrap the decoy is not even there: a plain "not found" is no refusal
        assert result.error == "forbidden", (name, result)


def test_the_hook_holds_no_mutable_or_global_state():
    """Static check of the property the hook's safety rests on: no closure, no global or free name read at run
    time, and only immutable objects or C functions among its defaults."""
    namespace: dict = {}
    exec(sandbox._RUNNER.replace("\n_main()\n", "\n"), namespace)  # noqa: S102 - the runner's own definitions
    hook = namespace["make_hook"]("/tmp/work", 99)
    functions = [hook, namespace["resolve"], namespace["path_text"], namespace["under"]]
    for fn in functions:
        assert fn.__closure__ is None, fn.__name__
        assert not fn.__kwdefaults__, fn.__name__
        ops = {ins.opname for ins in dis.get_instructions(fn)}
        assert not ops & {"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_CLOSURE", "STORE_GLOBAL",
                          "LOAD_CLASSDEREF"}, (fn.__name__, ops)
        names = fn.__code__.co_varnames[fn.__code__.co_argcount - len(fn.__defaults__ or ()):fn.__code__.co_argcount]
        for name, default in zip(names, fn.__defaults__ or ()):
            if name == "_classes":  # a snapshot of pathlib's classes, only ever compared by identity
                continue
            assert _immutable(default) or default in functions, (fn.__name__, name, default)


def _immutable(value) -> bool:
    if isinstance(value, (str, bytes, int, float, bool, type(None), type, frozenset)):
        return True
    if isinstance(value, tuple):
        return all(_immutable(v) or type(v).__name__ == "mappingproxy" for v in value)
    # C functions and slot wrappers: builtin_function_or_method, method_descriptor, method-wrapper
    return type(value).__name__ in ("builtin_function_or_method", "method_descriptor", "method-wrapper")


@pytest.mark.parametrize("mode", MODES)
def test_refusals_stay_recorded_whatever_the_program_does_to_the_report_channel(mode, decoy):
    limits = Limits(timeout_s=20.0, sandbox=mode)
    fd = "sys._getframe(1).f_locals['report_fd']"
    refused = f"try:\n    open('/etc/shadow-{secrets.token_hex(4)}', 'w')\nexcept Exception:\n    pass\n"
    for after in (f"import os\nos.close({fd})\n",
                  f"import os\nos.dup2(os.open('/dev/null', os.O_WRONLY), {fd})\n",
                  (f"import os, json\nos.write({fd}, b'R ' + json.dumps({{'status': 'ok', 'values': None}}).encode()"
                   " + b'\\n')\nos._exit(0)\n"),
                  f"import os\nos.write({fd}, b'garbage')\n"):
        result = run_python("import sys\n" + refused + after, limits=limits)
        assert result.error == "forbidden", (after, result)
    # closing the channel first does not let a later refusal go unrecorded either
    first = f"import os, sys\ntry:\n    os.close({fd})\nexcept OSError:\n    pass\n"
    assert run_python(first + refused, limits=limits).error == "forbidden"
    # and a program that only writes a fake result line of its own, with no refusal, is still just its result
    fake = f"import os, sys\nos.write({fd}, b'not a report line\\n')\n"
    assert run_python(fake, limits=limits).error == "forbidden"
