"""The program side of envs/sandbox.py: run as `python -I -S -B -c <this file's text>` inside the sandbox.

It reads one JSON request on stdin ({"program", "mode", "calls", "tests", "rlimits", "report_fd", "seccomp"}),
confines itself (resource limits, then a seccomp filter on itself: no new process, thread or exec, and its report
channel cannot be closed), installs the audit hook, and only then compiles the program. It writes its findings
to the report channel `report_fd`, one line each: `V <what>` for every refused operation at the moment it is
refused, and finally `R <json>` with the result. A program can write lines of its own there, but it cannot take
back a `V` line the hook wrote, and a result it forges carries only values it computed itself (the expected values
stay in the parent). Standard library only.

The audit hook is defence in depth (PEP 578 hooks are no boundary: the namespaces and seccomp are), yet it must not
be switched off from inside: it is no closure and reads no global name, so it holds no cell, dict or list a program
could reach through frames, tracebacks or gc and edit. Everything it uses is bound as a positional default when it
is defined (immutable tuples and strings, and C functions captured before the program runs, so monkeypatching
os, posixpath or builtins changes nothing it calls); replacing a function's __code__ or __defaults__ is itself
refused. It never calls the program's objects: a path is read only from a str, bytes or an exact stdlib pathlib
object (through the slot the path was already rendered into, and only while pathlib's classes are as the runner
found them), so no __fspath__ or __str__ of the program runs.
"""
# ruff: noqa: S102, BLE001, S110 - it runs untrusted code by design and must report every way that code can end
import _stat
import json
import os
import pathlib
import resource
import sys

BLOCKED = ("os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system", "os.kill", "os.killpg",
           "os.startfile", "subprocess.", "pty.", "socket.", "ctypes.", "signal.pthread_kill", "resource.setrlimit",
           "resource.prlimit", "_thread.start_new_thread", "os.setpriority", "sys.setprofile", "sys.settrace",
           "sys.addaudithook")
BAD_IMPORTS = ("_posixsubprocess", "_ctypes", "_socket", "_ssl", "_multiprocessing")
# event -> which arguments are paths that must lie in the work dir
PATH_EVENTS = (("os.remove", (0,)), ("os.rmdir", (0,)), ("os.mkdir", (0,)), ("os.rename", (0, 1)),
               ("os.link", (0, 1)), ("os.symlink", (1,)), ("os.truncate", (0,)), ("os.chmod", (0,)),
               ("os.chown", (0,)), ("os.utime", (0,)), ("os.chflags", (0,)), ("os.lchflags", (0,)),
               ("os.setxattr", (0,)), ("os.removexattr", (0,)), ("shutil.copyfile", (1,)), ("shutil.copymode", (1,)),
               ("shutil.copystat", (1,)), ("shutil.copytree", (1,)), ("shutil.rmtree", (0,)), ("shutil.move", (0, 1)))
# A function's behaviour lives in these; the hook and its helpers are functions.
GUARDED_ATTRS = ("__code__", "__defaults__", "__kwdefaults__")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_PURE_PATH_STR = pathlib.PurePath.__dict__.get("_str")  # the slot a pathlib path caches its text in (3.11-3.13)
PATH_TYPES = (pathlib.PurePosixPath, pathlib.PosixPath, pathlib.PurePath, pathlib.Path) if _PURE_PATH_STR else ()
# What decides the text os.fspath() gives for a pathlib object; a program that replaces one of them on a class
# (no audit event covers that) makes every pathlib path refused.
WATCHED = ("__fspath__", "__str__", "_str", "__getattribute__", "__getattr__")
_class_dict, _class_mro = type.__dict__["__dict__"].__get__, type.__dict__["__mro__"].__get__


def _path_class_state(cls):
    """(class, its MRO, every (live class-dict view, watched name, value) along it) as the runner found them."""
    mro = _class_mro(cls)
    views = [_class_dict(c) for c in mro]
    return cls, mro, tuple((v, name, v.get(name)) for v in views for name in WATCHED)


PATH_CLASSES = tuple(_path_class_state(cls) for cls in PATH_TYPES)


def path_text(path, _type=type, _str=str, _bytes=bytes, _decode=bytes.decode, _classes=PATH_CLASSES,
              _mro_of=_class_mro, _slot=_PURE_PATH_STR.__get__ if _PURE_PATH_STR else None, _Exception=Exception):
    """The text of a path argument without running any of the program's code, or None."""
    t = _type(path)
    if t is _str:
        return path
    if t is _bytes:
        return _decode(path, "utf-8", "surrogateescape")
    for cls, mro, watched in _classes:
        if t is cls:
            if _mro_of(t) is not mro:
                return None
            for view, name, value in watched:
                if view.get(name) is not value:
                    return None
            try:
                text = _slot(path)  # set by the __fspath__ call that open() made before the audit event
            except _Exception:
                return None
            return text if _type(text) is _str else None
    return None


def resolve(path, _lstat=os.lstat, _readlink=os.readlink, _is_link=_stat.S_ISLNK, _getcwd=os.getcwd,
            _OSError=OSError):
    """os.path.realpath from C functions only (posixpath.realpath is Python that a program could patch).
    None for a symlink loop."""
    if not path.startswith("/"):
        path = _getcwd() + "/" + path
    pending = path.split("/")[::-1]  # components still to resolve, the next one last
    done = []
    hops = 0
    while pending:
        name = pending.pop()
        if name == "" or name == ".":
            continue
        if name == "..":
            if done:
                done.pop()
            continue
        here = "/" + "/".join(done + [name])
        try:
            is_link = _is_link(_lstat(here).st_mode)
        except _OSError:  # does not exist (yet): the rest is taken as written
            is_link = False
        if not is_link:
            done.append(name)
            continue
        hops += 1
        if hops > 40:
            return None
        target = _readlink(here)
        if target.startswith("/"):
            done = []
        pending.extend(target.split("/")[::-1])
    return "/" + "/".join(done)


def under(real, roots):
    if real is None:
        return False
    for root in roots:
        if real == root or real.startswith(root + "/"):
            return True
    return False


def make_hook(work, report_fd):
    read_roots = (work, os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix), "/dev/null",
                  "/dev/urandom")

    # No name below is global or free: each is a parameter (see the module docstring).
    def hook(event, args, _work=(work,), _read=read_roots, _blocked=BLOCKED, _bad_imports=BAD_IMPORTS,
             _path_events=PATH_EVENTS, _guarded=GUARDED_ATTRS, _write_flags=WRITE_FLAGS, _text=path_text,
             _resolve=resolve, _under=under, _write=os.write, _fd=report_fd, _type=type, _int=int, _str=str,
             _stat=os.stat, _is_dir=_stat.S_ISDIR, _len=len, _OSError=OSError, _PermissionError=PermissionError):
        what = None
        if event.startswith(_blocked):
            what = event
        elif event == "import":
            if args[0] in _bad_imports:
                what = "import " + args[0]
        elif event == "object.__setattr__" or event == "object.__delattr__":
            if args[1] in _guarded:
                what = "changing a function's " + args[1]
        elif event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if _type(path) is not _int:
                text = _text(path)
                real = None if text is None else _resolve(text)
                shown = "a path object" if text is None else text[:150]
                if _type(mode) is _str:
                    writing = "w" in mode or "a" in mode or "x" in mode or "+" in mode
                else:
                    writing = _type(flags) is not _int or (flags & _write_flags) != 0
                if writing and not _under(real, _work):
                    what = "writing " + shown
                elif not _under(real, _read):
                    what = "reading " + shown
                elif mode is None and not _under(real, _work):
                    try:
                        if _is_dir(_stat(real).st_mode):
                            what = "opening directory " + shown
                    except _OSError:
                        pass
        else:
            for name, positions in _path_events:
                if event == name:
                    for i in positions:
                        if i < _len(args) and _type(args[i]) is not _int:
                            text = _text(args[i])
                            if not _under(None if text is None else _resolve(text), _work):
                                what = event + " " + ("a path object" if text is None else text[:150])
        if what is None:
            return
        try:
            _write(_fd, b"V " + what.replace("\n", " ").encode("utf-8", "backslashreplace")[:600] + b"\n")
        except _OSError:
            pass  # the channel is protected by seccomp where it can be; refused all the same
        raise _PermissionError("sandbox: " + what + " is not allowed")

    return hook


def install_seccomp(program):
    """Apply a seccomp filter (classic BPF bytes) to this process; ctypes is unloaded again afterwards, so a later
    `import ctypes` by the program is an import event the hook refuses."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        buf = ctypes.create_string_buffer(program, len(program))
        fprog = SockFprog(len(program) // 8, ctypes.addressof(buf))
        PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
    finally:
        for name in [m for m in sys.modules if m == "_ctypes" or m == "ctypes" or m.startswith("ctypes.")]:
            del sys.modules[name]


def _main():
    req = json.loads(sys.stdin.buffer.read())
    report_fd = req["report_fd"]
    unenforced = []
    for name, soft, hard in req["rlimits"]:
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (AttributeError, ValueError, OSError) as e:
            unenforced.append(name + ": " + str(e))
    if req["seccomp"]:
        try:
            install_seccomp(bytes.fromhex(req["seccomp"]))
        except (ImportError, OSError) as e:
            unenforced.append("seccomp: " + str(e))
    else:
        unenforced.append("seccomp: not available on this machine")
    mode = req["mode"]

    def emit(result):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        result["unenforced"] = unenforced
        data = b"R " + json.dumps(result).encode() + b"\n"
        while data:
            data = data[os.write(report_fd, data):]
        os._exit(0)

    sys.addaudithook(make_hook(os.path.realpath(os.getcwd()), report_fd))
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
