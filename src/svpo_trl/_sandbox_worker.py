"""Warm worker of :class:`svpo_trl.sandbox.PythonSandbox`; run as a script, never imported by the library.

The host starts this file as ``python -I _sandbox_worker.py CONFIG_JSON`` with a scrubbed environment.
It preloads a few modules once, then serves requests read from stdin (4-byte length + JSON) and
answers on stdout the same way. Each request is executed in a child forked from this warm
interpreter, so one execution costs a fork (a few ms) instead of an interpreter start (~10 ms plus
imports). The child is the only place where untrusted code runs; it is confined by

- its own process group (the worker kills the whole group at the wall-clock limit),
- rlimits: address space (memory), CPU seconds, file size, open files, no core dumps,
- an audit hook (PEP 578, cannot be removed once installed) that refuses process creation, sockets,
  signals to other processes, ctypes, writes outside its temporary directory and reading other
  processes' ``/proc`` entries (their environment may hold secrets),
- a fresh temporary working directory, removed after the execution.

Only the Python standard library may be imported here: the worker must start fast and must not
import the (heavy) ``svpo_trl`` package.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import ctypes
import errno
import gc
import io
import json
import math
import os
import resource
import select
import shutil
import signal
import struct
import subprocess  # noqa: F401  (loaded so that the child's copy can be defused, see _REMOVED_FUNCTIONS)
import sys
import tempfile
import time
import traceback

_HEADER = struct.Struct("!I")
_HARD_KILL_GRACE_S = 0.5  # after the child's own soft limit, before the worker kills it
_MAX_ERROR_CHARS = 1000  # an exception message can be arbitrarily long; the result must stay small
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_LIBC = ctypes.CDLL(None, use_errno=True)
# Resolved here, because the child refuses ctypes symbol lookups. Linux only; elsewhere the child
# is not killed with a dead worker and orphans are not reaped here (the other limits still hold).
_LIBC_PRCTL = getattr(_LIBC, "prctl", None)


def _prctl(option: int, value: int) -> None:
    if _LIBC_PRCTL is not None:
        _LIBC_PRCTL(option, value, 0, 0, 0)


# Events refused outright. Process creation is refused here because RLIMIT_NPROC is not enforced
# for root (CI runs as root); sockets because there is no network; ctypes because it reaches libc
# directly (fork, kill, ...) past every other check.
_DENIED_EVENTS = frozenset(
    {
        "os.fork",
        "os.forkpty",
        "os.exec",
        "os.spawn",
        "os.posix_spawn",
        "os.system",
        "os.startfile",
        "subprocess.Popen",
        "pty.spawn",
        "os.symlink",  # a symlink swapped between check and use could redirect a write outside
        "os.link",  # a hard link to an outside file makes it writable from inside
        "os.chroot",
        "socket.__new__",
        "socket.bind",
        "socket.connect",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "socket.sendto",
        "socket.sendmsg",
        "ctypes.dlopen",
        "ctypes.dlsym",
        "ctypes.dlsym/handle",
        "ctypes.call_function",
        "ctypes.cdata",
        "ctypes.cdata/buffer",
        "ctypes.string_at",
        "ctypes.wstring_at",
        "ctypes.PyObj_FromPtr",
        "sys.remote_exec",
        "signal.pthread_kill",
        "mmap.__new__",
        "resource.setrlimit",  # root with CAP_SYS_RESOURCE could raise the hard limits again
        "resource.prlimit",
    }
)
# Re-importing these (after deleting them from sys.modules) would bring back functions removed below.
_DENIED_IMPORTS = frozenset({"posix", "_posixsubprocess", "_signal", "_ctypes"})
# Functions with no audit event that could act outside the sandbox; removed in the child.
_REMOVED_FUNCTIONS = {
    "posix": ("mknod", "mkfifo", "chroot", "pidfd_open", "setns", "unshare", "_exit"),
    "os": ("mknod", "mkfifo", "chroot", "pidfd_open", "setns", "unshare"),
    "_signal": ("pidfd_send_signal", "pthread_kill"),
    "signal": ("pidfd_send_signal", "pthread_kill"),
    "_posixsubprocess": ("fork_exec",),  # subprocess's own fork+exec, with no audit event of its own
}
# Checked by path: refused unless every path argument lies inside the temporary directory.
_PATH_EVENTS = frozenset(
    {
        "os.remove",
        "os.rmdir",
        "os.rename",
        "os.mkdir",
        "os.chmod",
        "os.chown",
        "os.truncate",
        "os.utime",
        "os.setxattr",
        "os.removexattr",
        "os.chflags",
        "os.lchflags",
        "shutil.rmtree",
        "shutil.copyfile",
        "shutil.copymode",
        "shutil.copystat",
        "shutil.copytree",
        "shutil.move",
    }
)


# --------------------------------------------------------------------------- framing
def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _send(fd: int, obj: dict) -> None:
    payload = json.dumps(obj).encode("utf-8", "surrogatepass")
    _write_all(fd, _HEADER.pack(len(payload)) + payload)


def _receive(fd: int) -> dict | None:
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    payload = _read_exact(fd, _HEADER.unpack(header)[0])
    return None if payload is None else json.loads(payload)


# --------------------------------------------------------------------------- child side
class _CappedOutput(io.TextIOBase):
    """A text stream keeping the first ``limit`` characters and counting the rest (huge output)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list[str] = []
        self.kept = 0
        self.total = 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        self.total += len(s)
        room = self.limit - self.kept
        if room > 0:
            piece = s[:room]
            self.parts.append(piece)
            self.kept += len(piece)
        return len(s)

    def getvalue(self) -> str:
        text = "".join(self.parts)
        if self.total > self.kept:
            text += f"\n... [output truncated: {self.total - self.kept} more characters]"
        return text


def _clean_text(text: str | None) -> str | None:
    # Lone surrogates (print('\ud800')) are not valid UTF-8; downstream tokenizers would choke.
    return None if text is None else text.encode("utf-8", "replace").decode("utf-8")


def _path_of(arg) -> str | None:
    if isinstance(arg, bytes):
        return os.fsdecode(arg)
    if isinstance(arg, str):
        return arg
    if hasattr(arg, "__fspath__"):
        return os.fsdecode(os.fspath(arg))
    return None


def _make_audit_hook(workdir: str, own_pid: int, result_fd: int, config: dict):
    """The PEP 578 hook of the child. Raising from it aborts the audited operation.

    RLIMIT_FSIZE caps each file; ``max_write_opens`` caps how many files may be opened for writing,
    so that the directory (on a memory-backed tmpfs when available) stays small. Reads are free
    except other processes' ``/proc`` entries and the host user's home directory (tokens, keys),
    where only the Python installation and import path may be read.
    """
    max_write_opens = config["max_write_opens"]
    private_roots = tuple(p.rstrip(os.sep) + os.sep for p in config["private_roots"])
    python_roots = tuple(p.rstrip(os.sep) + os.sep for p in config["python_roots"])
    inside_prefix = workdir.rstrip(os.sep) + os.sep
    realpath, isdir, proc_prefix = os.path.realpath, os.path.isdir, "/proc/"
    own_pid_text = str(own_pid)
    allowed_writes = ("/dev/null",)
    write_opens = [0]

    def refuse(what: str):
        raise PermissionError(errno.EPERM, f"sandbox: {what} is not allowed")

    def inside(path: str) -> bool:
        # A relative '..' path may be resolved against a directory fd (dir_fd=), not the cwd: refused.
        if not os.path.isabs(path) and ".." in path.split(os.sep):
            return False
        resolved = realpath(path)
        return resolved == workdir or resolved.startswith(inside_prefix)

    def check_open(path, mode, flags) -> None:
        if isinstance(path, int):
            if path == result_fd:
                refuse("opening the result channel")
            return
        name = _path_of(path)
        if name is None:
            return
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        resolved = realpath(name)
        if resolved.startswith(proc_prefix):
            part = resolved[len(proc_prefix) :].split("/", 1)[0]
            if part.isdigit() and part != own_pid_text:
                refuse(f"reading another process's /proc entry ({name})")
        if (resolved + os.sep).startswith(private_roots) and not (resolved + os.sep).startswith(python_roots):
            refuse(f"reading the host user's private files ({name})")
        if writing:
            if resolved in allowed_writes:
                return
            if not inside(name):
                refuse(f"writing outside the sandbox directory ({name})")
            write_opens[0] += 1
            if write_opens[0] > max_write_opens:
                refuse(f"opening more than {max_write_opens} files for writing")
        elif not inside(name) and isdir(name):
            # A directory fd from outside would let dir_fd-relative writes escape the checks above.
            refuse(f"opening a directory outside the sandbox ({name})")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            check_open(*args[:3])
        elif event in _DENIED_EVENTS:
            refuse(event)
        elif event in _PATH_EVENTS:
            for arg in args:
                name = _path_of(arg)
                if name is not None and not inside(name):
                    refuse(f"{event} outside the sandbox directory ({name})")
        elif event in ("os.kill", "os.killpg"):
            if args[0] not in (own_pid, 0):
                refuse(f"{event} of another process")
        elif event == "import" and args[0] in _DENIED_IMPORTS:
            refuse(f"importing {args[0]}")

    return hook


def _last_line_of(exc: BaseException) -> str:
    """The last line of the traceback as Python prints it, e.g. ``ZeroDivisionError: division by zero``."""
    try:
        lines = traceback.format_exception_only(type(exc), exc)
        return lines[-1].strip() if lines else type(exc).__name__
    except BaseException:
        return type(exc).__name__


def _run_snippets(snippets: list[str], capture: _CappedOutput, discard: _CappedOutput) -> str | None:
    """Execute earlier snippets (output discarded), then the last (output captured). Returns the error."""
    namespace: dict = {"__name__": "__main__", "__builtins__": builtins}
    for index, source in enumerate(snippets[:-1]):
        sys.stdout = sys.stderr = discard
        # Like a notebook: a failed earlier cell leaves its partial state and the path goes on.
        with contextlib.suppress(BaseException):
            exec(compile(source, f"<step {index}>", "exec"), namespace)
    sys.stdout = sys.stderr = capture
    source = snippets[-1] if snippets else ""
    name = f"<step {len(snippets) - 1}>"
    try:
        tree = ast.parse(source, name)
        last_expr = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, name, "exec"), namespace)
        if last_expr is not None:
            value = eval(compile(ast.Expression(last_expr.value), name, "eval"), namespace)
            # A notebook shows the value of a trailing bare expression; only when nothing was printed.
            if value is not None and capture.total == 0:
                capture.write(repr(value))
        return None
    except SystemExit as exc:
        return f"SystemExit: {0 if exc.code is None else exc.code}"
    except BaseException as exc:
        return _last_line_of(exc)
    finally:
        namespace.clear()


def _child(request_fd: int, result_fd: int, workdir: str, config: dict) -> None:
    """Runs in the forked child; never returns (ends with ``_exit``).

    The child is forked ahead of its request: it confines itself, then waits on ``request_fd``
    for the snippets, so that the fork and the set-up are off the critical path of an execution.
    """
    real_exit, write_all, dumps = os._exit, _write_all, json.dumps
    # A new session, not only a new group: joining the worker's group (setpgid) is then impossible,
    # so a kill(0, ...) from the snippet reaches only its own group.
    os.setsid()
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    low, high = sorted((request_fd, result_fd))
    os.closerange(3, low)
    os.closerange(low + 1, high)
    os.closerange(high + 1, 1 << 16)
    os.chdir(workdir)
    os.environ["HOME"] = os.environ["TMPDIR"] = workdir
    tempfile.tempdir = workdir

    cpu_s = _cpu_limit_s(config)
    memory = config["memory_mb"] * 1024 * 1024
    limits = [
        (resource.RLIMIT_AS, (memory, memory)),
        (resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)),  # SIGXCPU first, SIGKILL a second later
        (resource.RLIMIT_FSIZE, (config["max_file_mb"] * 1024 * 1024,) * 2),
        (resource.RLIMIT_NOFILE, (64, 64)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    for limit, values in limits:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(limit, values)

    capture = _CappedOutput(config["max_output_chars"])
    discard = _CappedOutput(0)

    def report(error: str | None, timed_out: bool = False) -> None:
        if error is not None and len(error) > _MAX_ERROR_CHARS:
            error = error[:_MAX_ERROR_CHARS] + " ... [error truncated]"
        result = {
            "stdout": _clean_text(capture.getvalue()),
            "error": _clean_text(error),
            "timed_out": timed_out,
        }
        write_all(result_fd, dumps(result, ensure_ascii=False).encode("utf-8"))

    def exit_with_report(status: int = 0) -> None:
        # os._exit from untrusted code: keep what was printed and say how it ended.
        with contextlib.suppress(BaseException):
            report(f"SystemExit: {status} (os._exit)")
        real_exit(0)

    for module_name, names in _REMOVED_FUNCTIONS.items():
        module = sys.modules.get(module_name)
        for name in names:
            if module is not None and hasattr(module, name):
                delattr(module, name)
    os._exit = exit_with_report
    hook = _make_audit_hook(os.path.realpath(workdir), os.getpid(), result_fd, config)
    sys.addaudithook(hook)

    chunks = []
    while chunk := os.read(request_fd, 65536):
        chunks.append(chunk)
    os.close(request_fd)
    if not chunks:  # the worker is shutting down and discarded this child
        real_exit(0)
    snippets = json.loads(b"".join(chunks))

    # Soft time limit: interrupt the snippet like a notebook's "interrupt kernel", keeping what it
    # printed. The worker's hard kill a little later covers code that never returns to the
    # interpreter loop (a huge C-level computation) or that swallows the exception.
    timeout_message = _timeout_message(config)
    fired = []

    def interrupt(signum, frame):
        fired.append(True)
        raise TimeoutError(timeout_message[len("TimeoutError: ") :])

    signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, config["timeout_s"])
    error: str | None
    try:
        error = _run_snippets(snippets, capture, discard)
    except BaseException as exc:  # MemoryError while cleaning up, a late interrupt, ...
        error = _last_line_of(exc)
    with contextlib.suppress(BaseException):
        signal.setitimer(signal.ITIMER_REAL, 0)
    if fired:
        error = timeout_message
    if error is not None and error.startswith("MemoryError"):
        gc.collect()  # free the cycles that filled the memory, so that reporting can allocate
    with contextlib.suppress(BaseException):
        report(error, timed_out=bool(fired))
    real_exit(0)


# --------------------------------------------------------------------------- worker side
def _cpu_limit_s(config: dict) -> int:
    # Above the wall-clock limit: a single thread never reaches it before the worker's kill, so it
    # only catches snippets that burn several cores at once, or a worker that failed to kill.
    return math.ceil(config["timeout_s"]) + 1


def _describe_status(status: int, cpu_s: float, config: dict) -> tuple[str, bool]:
    """Error text (and whether it is a timeout) of a child that ended without reporting."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        limit = _cpu_limit_s(config)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= limit - 0.05):
            return f"TimeoutError: CPU time limit of {limit} s exceeded", True
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGSEGV:
            return (
                f"RecursionError: process crashed with {name} (C stack overflow, e.g. deep recursion)"
            ), False
        if sig == signal.SIGKILL:
            return f"ProcessKilled: process killed by {name} (out of memory, or killed from outside)", False
        return f"ProcessKilled: process killed by signal {name}", False
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
    return f"SystemExit: process exited with status {code} before reporting", False


def _reap_orphans() -> None:
    # As child subreaper, this worker inherits whatever the child left behind; reap it all.
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


class _Child:
    """A confined child forked ahead of its request, waiting for snippets on ``request_fd``."""

    def __init__(self, config: dict):
        self.workdir = tempfile.mkdtemp(prefix="exec-", dir=config["base_dir"])
        request_read, self.request_fd = os.pipe()
        self.result_fd, result_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(self.request_fd)
                os.close(self.result_fd)
                _child(request_read, result_write, self.workdir, config)
            finally:
                os._exit(70)
        os.close(request_read)
        os.close(result_write)

    def submit(self, snippets: list[str]) -> bool:
        """Hand the snippets over; False if the child is already gone."""
        try:
            _write_all(self.request_fd, json.dumps(snippets).encode("utf-8", "surrogatepass"))
            return True
        except OSError:
            return False
        finally:
            os.close(self.request_fd)
            self.request_fd = -1

    def collect(self, deadline: float, limit: int) -> tuple[bytes, bool]:
        """Read the child's report until EOF or the deadline; returns (data, timed_out)."""
        chunks, size = [], 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return b"".join(chunks), True
            ready, _, _ = select.select([self.result_fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self.result_fd, 65536)
            if not chunk:
                return b"".join(chunks), False
            if size < limit:
                chunks.append(chunk)
                size += len(chunk)

    def finish(self) -> int:
        """Kill whatever is left of the child's session, reap it, remove its directory; returns its status."""
        for fd in (self.request_fd, self.result_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.request_fd = self.result_fd = -1
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(OSError):
                kill(self.pid, signal.SIGKILL)
        _, status, usage = os.wait4(self.pid, 0)
        self.cpu_s = usage.ru_utime + usage.ru_stime
        _reap_orphans()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return status


def _timeout_message(config: dict) -> str:
    return f"TimeoutError: execution exceeded the {config['timeout_s']:g} s time limit"


def execute(child: _Child, snippets: list[str], config: dict) -> dict:
    """Run ``snippets`` in the waiting ``child`` (at most ``timeout_s``), clean up; returns the result dict."""
    started = time.monotonic()
    # JSON of the capped output and error: at most 6 bytes per character (\u escapes), plus slack.
    limit = 6 * (config["max_output_chars"] + _MAX_ERROR_CHARS) + 65536
    data, timed_out = b"", False
    if not child.submit(snippets):
        # It died waiting (killed from outside, out of memory): not the snippets' doing, so retry once.
        child.finish()
        child = _Child(config)
        started = time.monotonic()
        child.submit(snippets)
    try:
        data, timed_out = child.collect(started + config["timeout_s"] + _HARD_KILL_GRACE_S, limit)
    finally:
        status = child.finish()

    if timed_out:
        return {"stdout": "", "error": _timeout_message(config), "timed_out": True}
    result = None
    if data:
        with contextlib.suppress(ValueError):
            result = json.loads(data.decode("utf-8", "replace"))
    if (
        isinstance(result, dict)
        and isinstance(result.get("stdout"), str)
        and isinstance(result.get("error"), (str, type(None)))
    ):
        return {
            "stdout": result["stdout"],
            "error": result["error"],
            "timed_out": result.get("timed_out") is True,
        }
    error, is_timeout = _describe_status(status, child.cpu_s, config)
    return {"stdout": "", "error": error, "timed_out": is_timeout}


def main() -> None:
    config = json.loads(sys.argv[1])
    # The script's own directory must not shadow modules the untrusted code imports.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p) != os.path.dirname(os.path.abspath(__file__))]
    # The protocol uses the original stdin/stdout; stray writes to fds 0-2 must not corrupt it.
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    sys.stdin = sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the host; it closes us.
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    for name in config["preload"]:
        with contextlib.suppress(Exception):
            __import__(name)
    gc.collect()
    gc.freeze()  # keeps the preloaded objects' pages shared with the forked children
    child = _Child(config)
    _send(proto_out, {"ready": True, "pid": os.getpid()})
    while True:
        request = _receive(proto_in)
        if request is None:
            child.finish()
            with contextlib.suppress(OSError):
                os.rmdir(config["base_dir"])  # succeeds for the last worker out, if the host is gone
            return
        try:
            reply = execute(child, request["snippets"], config)
        except Exception as exc:  # a bug here must not kill the worker silently
            reply = {"stdout": "", "error": f"SandboxError: {_last_line_of(exc)}", "timed_out": False}
        _send(proto_out, reply)
        # Fork the next child while the host digests this reply and prepares the next request.
        child = _Child(config)


if __name__ == "__main__":
    main()
