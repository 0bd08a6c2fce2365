"""Isolated execution of model-written code steps (the "environment" of the paper's C-steps, §3.1, A.1).

Along one solution path the code steps share state like notebook cells: ``run(snippets)`` runs the
earlier steps' snippets and then the new one, and returns what the new one printed.

Model-written code is untrusted, and a search executes hundreds of snippets per second, so
:class:`PythonSandbox` keeps a pool of warm worker interpreters (``python -I``, scrubbed environment,
common modules preloaded). Each execution forks a fresh child from a worker (a few ms), confines it
(its own session, rlimits, a PEP 578 audit hook, a private temporary directory) and reports back. A
timeout, crash or limit breach is a result (``error``, ``timed_out``), never an exception that stops
a search. The containment itself lives in :mod:`svpo_trl._sandbox_worker`.

What is contained, each as a result with the host and the pool unharmed: infinite loops (interrupted
at ``timeout_s``, killed 0.5 s later if they do not yield), runaway memory (``MemoryError``), fork
bombs and process floods (refused), deep recursion, huge output (truncated), ``sys.exit`` and
``os._exit``, signals to the parent or any other process (refused), network access (refused),
writes outside the private temporary directory (refused; the directory is removed afterwards),
reading the host's environment (not inherited; other processes' ``/proc`` and the host user's
home are unreadable). This is defence in depth for model-written arithmetic, not a boundary
against a determined attacker (use a container or VM for that).

Example::

    with PythonSandbox(timeout_s=5) as sandbox:
        sandbox.run(["x = 6", "print(x * 7)"])  # ExecResult(stdout='42\\n', error=None, timed_out=False)
        sandbox.run_many([["1 / 0"], ["2 ** 10"]])  # [...'ZeroDivisionError: division by zero', ...'1024']
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_WORKER_SCRIPT = Path(__file__).with_name("_sandbox_worker.py")
_HEADER = struct.Struct("!I")
# Modules the workers import once, so that a snippet importing them pays nothing.
DEFAULT_PRELOAD = (
    "math",
    "cmath",
    "fractions",
    "decimal",
    "itertools",
    "functools",
    "collections",
    "statistics",
    "random",
    "re",
    "string",
    "datetime",
    "heapq",
    "bisect",
)
# The only environment the workers get: nothing of the host's (API keys, tokens) is inherited.
_WORKER_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


@dataclass
class ExecResult:
    """Outcome of one execution.

    ``stdout`` is what the last snippet printed, stdout and stderr interleaved as a notebook shows
    them (truncated to ``max_output_chars`` with a marker), or, if it printed nothing and ends in a
    bare expression, that value's ``repr``. What earlier snippets printed is not included.
    ``error`` is the last line of the traceback (``"ZeroDivisionError: division by zero"``), or a
    line of the same shape for a limit breach (``"TimeoutError: ..."``, ``"MemoryError: ..."``),
    else None. ``timed_out`` is True when the wall-clock or CPU time limit was hit.
    """

    stdout: str
    error: str | None = None
    timed_out: bool = False


class _Worker:
    """One warm worker process and its pipes; used by one thread at a time."""

    def __init__(self, python: str, config: dict):
        self.process = subprocess.Popen(
            [python, "-I", str(_WORKER_SCRIPT), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=dict(_WORKER_ENV),
            cwd=config["base_dir"],
            close_fds=True,
            # Its own session: terminal signals aimed at the host's group do not reach it.
            start_new_session=True,
        )
        self.stdin_fd = self.process.stdin.fileno()
        self.stdout_fd = self.process.stdout.fileno()
        ready = self.receive(deadline=time.monotonic() + 60)
        if not ready or not ready.get("ready"):
            self.kill()
            raise RuntimeError(f"sandbox worker failed to start ({python} {_WORKER_SCRIPT})")

    def _read_exact(self, n: int, deadline: float) -> bytes | None:
        chunks, got = [], 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.stdout_fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self.stdout_fd, n - got)
            if not chunk:
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def receive(self, deadline: float) -> dict | None:
        header = self._read_exact(_HEADER.size, deadline)
        if header is None:
            return None
        payload = self._read_exact(_HEADER.unpack(header)[0], deadline)
        return None if payload is None else json.loads(payload.decode("utf-8", "surrogatepass"))

    def send(self, obj: dict) -> None:
        payload = json.dumps(obj).encode("utf-8", "surrogatepass")
        data = memoryview(_HEADER.pack(len(payload)) + payload)
        while data:
            data = data[os.write(self.stdin_fd, data) :]

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()
        with contextlib.suppress(Exception):
            self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                stream.close()

    def request_exit(self) -> None:
        # EOF on stdin asks the worker to exit (after its current execution, if any).
        with contextlib.suppress(OSError):
            self.process.stdin.close()

    def wait_or_kill(self, deadline: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        self.kill()


class PythonSandbox:
    """Runs untrusted Python snippets in confined, forked children of a pool of warm workers.

    Args:
        timeout_s: wall-clock limit of one execution (all snippets of the path), in seconds: the
            snippet is interrupted then (its output so far kept) and killed 0.5 s later if it does
            not stop; the CPU-time limit is the same, rounded up. 5 s: the arithmetic of a reasoning step takes
            milliseconds, so anything near 5 s is a runaway loop, and a search cannot wait longer.
        memory_mb: address-space limit of the executing process. 1024 MB: room for sympy/numpy
            work, yet 2 parallel runaways cannot exhaust a small machine.
        max_output_chars: the last snippet's output is cut to this many characters (a marker says
            how many more there were). 1000: the output is pasted into the model's context, where
            a long dump only wastes tokens; a step's useful output is a few numbers.
        num_workers: size of the worker pool (grown on demand up to ``run_many``'s ``max_workers``);
            default ``os.cpu_count()``.
        max_file_mb: largest file a snippet may write inside its temporary directory.
        max_write_opens: how many times a snippet may open a file for writing; with
            ``max_file_mb`` it bounds the disk (or tmpfs memory) one execution can fill.
        tmp_dir: where the per-execution directories are made. Default: ``/dev/shm`` when it is a
            writable directory (memory-backed: creating and removing a directory there costs
            microseconds instead of milliseconds on a slow disk), else the system temp directory.
        preload: modules each worker imports once before forking (``DEFAULT_PRELOAD``).
        python: the interpreter of the workers (default: this one).

    Thread-safe: ``run`` and ``run_many`` may be called from many threads at once. Close with
    ``close()`` or a ``with`` block; an ``atexit`` hook closes forgotten sandboxes.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        memory_mb: int = 1024,
        max_output_chars: int = 1000,
        *,
        num_workers: int | None = None,
        max_file_mb: int = 4,
        max_write_opens: int = 64,
        tmp_dir: str | None = None,
        preload: tuple[str, ...] | list[str] = DEFAULT_PRELOAD,
        python: str | None = None,
    ):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        if not int(memory_mb) >= 64:
            raise ValueError(f"memory_mb must be >= 64 (a Python process needs that much), got {memory_mb!r}")
        if not int(max_output_chars) >= 0:
            raise ValueError(f"max_output_chars must be >= 0, got {max_output_chars!r}")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.max_output_chars = int(max_output_chars)
        self.num_workers = max(1, num_workers or os.cpu_count() or 1)
        self.python = python or sys.executable
        self._base_dir = tempfile.mkdtemp(prefix="svpo-sandbox-", dir=tmp_dir or _default_tmp_dir())
        self._config = {
            "timeout_s": self.timeout_s,
            "memory_mb": self.memory_mb,
            "max_output_chars": self.max_output_chars,
            "max_file_mb": int(max_file_mb),
            "max_write_opens": int(max_write_opens),
            "preload": list(preload),
            "base_dir": self._base_dir,
            "private_roots": _private_roots(),
            "python_roots": _python_roots(),
        }
        self._lock = threading.Condition()
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._starting = 0
        self._capacity = self.num_workers
        self._closed = False
        self._owner_pid = os.getpid()
        # atexit holds only a weak reference, so a dropped sandbox can still be collected.
        self._atexit = _make_closer(weakref.ref(self))
        atexit.register(self._atexit)

    # ------------------------------------------------------------------ pool
    def _acquire(self) -> _Worker:
        if os.getpid() != self._owner_pid:
            # A forked copy (DataLoader worker, multiprocessing) would share the parent's pipes.
            raise RuntimeError("PythonSandbox was created in another process; create one in this process")
        with self._lock:
            while True:
                if self._closed:
                    raise RuntimeError("PythonSandbox is closed")
                if self._idle:
                    return self._idle.pop()
                if len(self._all) + self._starting < self._capacity:
                    self._starting += 1
                    break
                self._lock.wait()
        try:
            worker = _Worker(self.python, self._config)
        finally:
            with self._lock:
                self._starting -= 1
                self._lock.notify()
        with self._lock:
            if self._closed:
                worker.kill()
                raise RuntimeError("PythonSandbox is closed")
            self._all.add(worker)
        return worker

    def _release(self, worker: _Worker, healthy: bool) -> None:
        with self._lock:
            keep = healthy and not self._closed and worker.alive()
            if keep:
                self._idle.append(worker)
            else:
                self._all.discard(worker)
            self._lock.notify()
        if not keep:
            worker.kill()

    def warmup(self, num_workers: int | None = None) -> None:
        """Start the workers now rather than on first use (each start takes ~0.1 s)."""
        count = num_workers or self.num_workers
        with self._lock:
            self._capacity = max(self._capacity, count)
        workers = [self._acquire() for _ in range(count)]
        for worker in workers:
            self._release(worker, healthy=True)

    # ------------------------------------------------------------------ execution
    def run(self, snippets: list[str]) -> ExecResult:
        """Run the earlier ``snippets`` of a solution path, then the last; return the last one's result."""
        snippets = _check_snippets(snippets)
        worker = self._acquire()
        healthy = False
        try:
            worker.send({"snippets": snippets})
            # The worker enforces timeout_s itself; the margin covers fork, reporting and cleanup.
            reply = worker.receive(deadline=time.monotonic() + self.timeout_s + 10.0)
            if reply is None:
                return ExecResult("", "SandboxError: the sandbox worker stopped responding", False)
            healthy = True
            return ExecResult(reply["stdout"], reply["error"], bool(reply["timed_out"]))
        except (OSError, ValueError, KeyError) as exc:
            return ExecResult("", f"SandboxError: lost the sandbox worker ({exc})", False)
        finally:
            self._release(worker, healthy)

    def run_many(self, snippet_lists: list[list[str]], max_workers: int | None = None) -> list[ExecResult]:
        """``run`` every path in parallel on up to ``max_workers`` workers; results in input order."""
        paths = [_check_snippets(s, row=i) for i, s in enumerate(snippet_lists)]
        if not paths:
            return []
        workers = max(1, min(max_workers or os.cpu_count() or 1, len(paths)))
        with self._lock:
            self._capacity = max(self._capacity, workers)
        if workers == 1:
            return [self.run(p) for p in paths]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(self.run, paths))

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop every worker (and its children) and remove the sandbox's temporary directories."""
        if os.getpid() != self._owner_pid:
            self._closed = True  # a forked copy: the workers belong to the parent, leave them be
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._all)
            self._all.clear()
            self._idle.clear()
            self._lock.notify_all()
        for worker in workers:
            worker.request_exit()
        # Idle workers exit at once; a busy one gets a moment to finish, then is killed.
        deadline = time.monotonic() + 1.0
        for worker in workers:
            worker.wait_or_kill(deadline)
        shutil.rmtree(self._base_dir, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self._atexit)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for monitoring and tests)."""
        with self._lock:
            return [w.process.pid for w in self._all]

    def __enter__(self) -> PythonSandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _private_roots() -> list[str]:
    """Directories whose files a snippet may not read: the host user's home (tokens, keys, caches)."""
    home = os.path.realpath(os.path.expanduser("~"))
    return [home] if home not in ("/", "") else []


def _python_roots() -> list[str]:
    """Directories a snippet must be able to read even inside a private root: the interpreter and imports."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path}
    return sorted({os.path.realpath(r) for r in roots if r and os.path.isdir(r)})


def _default_tmp_dir() -> str | None:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


def _make_closer(ref: weakref.ref):
    def close() -> None:
        sandbox = ref()
        if sandbox is not None:
            sandbox.close()

    return close


def _check_snippets(snippets, row: int | None = None) -> list[str]:
    where = "" if row is None else f"snippet_lists[{row}]: "
    if isinstance(snippets, str) or not isinstance(snippets, (list, tuple)):
        raise TypeError(f"{where}expected a list of code strings, got {type(snippets).__name__}")
    for i, snippet in enumerate(snippets):
        if not isinstance(snippet, str):
            raise TypeError(f"{where}snippet {i} must be a str, got {type(snippet).__name__}")
    return list(snippets)
