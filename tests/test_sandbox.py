"""PythonSandbox: results of ordinary code, and containment of hostile code with the host unharmed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from svpo_trl.sandbox import ExecResult, PythonSandbox

TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def sandbox():
    with PythonSandbox(timeout_s=TIMEOUT_S, memory_mb=256, max_output_chars=100, num_workers=2) as box:
        yield box


def assert_pool_healthy(sandbox: PythonSandbox) -> None:
    """The host survived and the pool still executes correctly."""
    assert sandbox.run(["a = 20", "print(a + 22)"]) == ExecResult("42\n", None, False)


# --------------------------------------------------------------------------- ordinary results
def test_printed_values(sandbox):
    assert sandbox.run(["print(3 + 4)"]) == ExecResult("7\n", None, False)
    assert sandbox.run(["print(7 // 2, 7 % 2)\nprint(2 ** 10)"]).stdout == "3 1\n1024\n"


def test_bare_expression_repr_like_a_notebook(sandbox):
    assert sandbox.run(["2 ** 10"]).stdout == "1024"
    assert sandbox.run(["from fractions import Fraction\nFraction(1, 3) + Fraction(1, 6)"]).stdout == (
        "Fraction(1, 2)"
    )
    assert sandbox.run(["'a' * 3"]).stdout == "'aaa'"
    # Not shown when the snippet printed something, nor for None.
    assert sandbox.run(["print(1)\n2 + 2"]).stdout == "1\n"
    assert sandbox.run(["x = 5\nNone"]).stdout == ""
    assert sandbox.run(["x = 5"]).stdout == ""


def test_state_carried_across_snippets_and_earlier_output_dropped(sandbox):
    result = sandbox.run(
        ["x = 5\nprint('earlier')", "import math\ny = x * 3", "print(x + y, math.factorial(4))"]
    )
    assert result == ExecResult("20 24\n", None, False)
    # A failed earlier snippet keeps its partial state, like a notebook cell.
    assert sandbox.run(["z = 2\n1 / 0\nz = 3", "print(z)"]).stdout == "2\n"


def test_errors_are_the_last_traceback_line(sandbox):
    assert sandbox.run(["1 / 0"]) == ExecResult("", "ZeroDivisionError: division by zero", False)
    assert sandbox.run(["print(x)"]).error == "NameError: name 'x' is not defined"
    assert sandbox.run(["def f(:\n  pass"]).error == "SyntaxError: invalid syntax"
    # What was printed before the error is kept.
    assert sandbox.run(["print('before')\n[][1]"]) == ExecResult(
        "before\n", "IndexError: list index out of range", False
    )


def test_run_many_preserves_order(sandbox):
    paths = [["a = 1", "b = 2", f"print(a + b * {i})"] for i in range(30)] + [["1 / 0"]]
    results = sandbox.run_many(paths, max_workers=3)
    assert [r.stdout for r in results[:-1]] == [f"{1 + 2 * i}\n" for i in range(30)]
    assert results[-1].error == "ZeroDivisionError: division by zero"
    assert sandbox.run_many([]) == []


def test_usable_from_many_threads(sandbox):
    outputs: dict[int, list[str]] = {}

    def work(t: int) -> None:
        outputs[t] = [r.stdout for r in sandbox.run_many([[f"print({t} * 100 + {i})"] for i in range(8)])]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outputs == {t: [f"{t * 100 + i}\n" for i in range(8)] for t in range(4)}


def test_bad_input_names_the_row():
    with PythonSandbox() as box:
        with pytest.raises(TypeError, match=r"snippet_lists\[1\]: snippet 0 must be a str"):
            box.run_many([["print(1)"], [3]])
        with pytest.raises(TypeError, match="expected a list of code strings"):
            box.run("print(1)")
    with pytest.raises(ValueError, match="timeout_s"):
        PythonSandbox(timeout_s=0)


# --------------------------------------------------------------------------- containment
def test_infinite_loop_killed_near_the_time_limit(sandbox):
    message = f"TimeoutError: execution exceeded the {TIMEOUT_S:g} s time limit"
    for code in (
        "while True: pass",
        "import time\ntime.sleep(60)",
        "while True:\n    try:\n        pass\n    except:\n        pass",
    ):
        start = time.monotonic()
        result = sandbox.run(["x = 1", code])
        elapsed = time.monotonic() - start
        assert result == ExecResult("", message, True)
        assert TIMEOUT_S <= elapsed < TIMEOUT_S + 0.8
    # What was printed before the limit is kept (the snippet is interrupted, like a notebook cell) ...
    result = sandbox.run(["print('started')\nwhile True:\n    pass"])
    assert result == ExecResult("started\n", message, True)
    # ... unless the snippet never returns to the interpreter (one huge C-level computation): then
    # the worker kills it, half a second later.
    start = time.monotonic()
    assert sandbox.run(
        ["import hashlib\nprint('started')\nhashlib.pbkdf2_hmac('sha256', b'k', b's', 10 ** 9)"]
    ) == ExecResult("", message, True)
    assert time.monotonic() - start < TIMEOUT_S + 0.8
    assert_pool_healthy(sandbox)


def test_runaway_memory(sandbox):
    assert sandbox.run(["x = bytearray(1024 ** 3)"]).error == "MemoryError"
    # Growing to the limit takes a few tenths of a second, more on a loaded machine: a longer timeout.
    with PythonSandbox(timeout_s=10, memory_mb=128, num_workers=1) as box:
        grow = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 * 1024 ** 2))"
        result = box.run(["print('growing')", grow])
        assert result == ExecResult("", "MemoryError", False)
        assert box.run(["x = 'still fine'\nx"]).stdout == "'still fine'"
    assert_pool_healthy(sandbox)


@pytest.mark.parametrize(
    "code",
    [
        "import os\nwhile True:\n    os.fork()",
        "import subprocess\nsubprocess.run(['sleep', '5'])",
        "import os\nos.system('sleep 5')",
        "import os\nos.execv('/bin/sleep', ['sleep', '5'])",
        "import os\nos.posix_spawn('/bin/sleep', ['sleep', '5'], {})",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
        "import ctypes\nctypes.CDLL(None).fork()",
        "import _posixsubprocess\n_posixsubprocess.fork_exec",
        "import pty\npty.fork()",
    ],
)
def test_process_creation_refused(code):
    # 3 s: room for a loaded machine to import, still short of the 5 s sleeps a leak would start.
    with PythonSandbox(timeout_s=3.0, memory_mb=256, max_output_chars=100, num_workers=2) as sandbox:
        result = sandbox.run([code])
        assert result.error is not None
        assert result.error.startswith(("PermissionError", "AttributeError")), result.error
        assert not result.timed_out
        assert_pool_healthy(sandbox)


def test_deep_recursion(sandbox):
    assert sandbox.run(["def f(n):\n    return f(n + 1)\nf(0)"]).error.startswith("RecursionError")
    # With the recursion limit lifted the process runs out of memory, stack or time: still a result.
    deep = "import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1) + 1\nf(0)"
    result = sandbox.run([deep])
    assert result.error is not None
    assert result.error.startswith(("RecursionError", "MemoryError", "TimeoutError", "ProcessKilled"))
    # Recursion through C code with the limit lifted overflows the C stack: a crash, reported as such.
    crash = "import sys\nsys.setrecursionlimit(10 ** 6)\ndef f(n):\n    return list(map(f, [n]))\nf(0)"
    result = sandbox.run([crash])
    assert result.error.startswith("RecursionError: process crashed with SIGSEGV"), result
    assert_pool_healthy(sandbox)


def test_huge_output_truncated(sandbox):
    result = sandbox.run(["print('x' * 250)"])
    assert result.stdout == "x" * 100 + "\n... [output truncated: 151 more characters]"
    result = sandbox.run(["for i in range(10 ** 5):\n    print(i)"])
    assert result.stdout.startswith("0\n1\n2\n") and "[output truncated:" in result.stdout
    assert len(result.stdout) < 160
    assert_pool_healthy(sandbox)


def test_exit_calls(sandbox):
    assert sandbox.run(["import sys\nprint('a')\nsys.exit(0)"]) == ExecResult("a\n", "SystemExit: 0", False)
    assert sandbox.run(["import sys\nsys.exit('bye')"]).error == "SystemExit: bye"
    assert sandbox.run(["exit(2)"]).error == "SystemExit: 2"
    assert sandbox.run(["import sys\nsys.exit()"]).error == "SystemExit: 0"
    assert sandbox.run(["import os\nprint('b')\nos._exit(3)"]) == ExecResult(
        "b\n", "SystemExit: 3 (os._exit)", False
    )
    assert_pool_healthy(sandbox)


def test_signals_to_parent_and_host_refused(sandbox):
    host = os.getpid()
    for code in (
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        f"import os, signal\nos.kill({host}, signal.SIGTERM)",
        f"import os, signal\nos.killpg(os.getpgid({host}), signal.SIGKILL)",
        "import os, signal\nos.kill(-1, signal.SIGKILL)",
        "import signal, threading\nsignal.pthread_kill(threading.main_thread().ident, 9)",
    ):
        result = sandbox.run([code])
        assert result.error is not None and result.error.startswith(("PermissionError", "AttributeError")), (
            code,
            result,
        )
    # Killing itself is allowed, and is a result.
    result = sandbox.run(["import os, signal\nprint('bye')\nos.kill(os.getpid(), signal.SIGTERM)"])
    assert result.error == "ProcessKilled: process killed by signal SIGTERM"
    assert_pool_healthy(sandbox)


def test_network_refused(sandbox):
    for code in (
        "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)",
        "import socket\nsocket.create_connection(('127.0.0.1', 80), timeout=1)",
        "import socket\nsocket.getaddrinfo('example.com', 80)",
        "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)",
        "import socket\nsocket.socket(socket.AF_UNIX)",
    ):
        result = sandbox.run([code])
        assert result.error is not None and "sandbox: socket." in result.error, (code, result)
    assert_pool_healthy(sandbox)


def test_writes_confined_to_private_directory(sandbox, tmp_path):
    outside = tmp_path / "outside.txt"
    attempts = [
        f"open({str(outside)!r}, 'w').write('x')",
        f"import os\nos.close(os.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT))",
        f"import pathlib\npathlib.Path({str(outside)!r}).write_text('x')",
        "open('/tmp/outside', 'a').write('x')",
        "open('../escape.txt', 'w').write('x')",
        f"import os\nos.symlink({str(outside)!r}, 'link')\nopen('link', 'w').write('x')",
        f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\nos.open('outside.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
        f"import os\nos.mkfifo({str(outside)!r})",
        f"import shutil\nshutil.copy('/etc/hostname', {str(outside)!r})",
        "import os\nos.makedirs('a/b')\nos.chdir('a/b')\nfd = os.open('../..', os.O_RDONLY)\nos.mkdir('../../x', dir_fd=fd)",
    ]
    for code in attempts:
        result = sandbox.run([code])
        assert result.error is not None and result.error.startswith(("PermissionError", "AttributeError")), (
            code,
            result,
        )
        assert not outside.exists(), code
    assert not os.path.exists("/tmp/outside")

    kept = tmp_path / "kept.txt"
    kept.write_text("keep me")
    for code in (f"import os\nos.remove({str(kept)!r})", f"import os\nos.rename({str(kept)!r}, 'mine.txt')"):
        assert sandbox.run([code]).error.startswith("PermissionError"), code
    assert kept.read_text() == "keep me"
    assert_pool_healthy(sandbox)


def test_private_directory_usable_then_removed(sandbox):
    code = (
        "import os, tempfile\nopen('a.txt', 'w').write('ok')\nos.mkdir('sub')\n"
        "with tempfile.NamedTemporaryFile('w', delete=False) as f:\n    f.write('t')\n"
        "print(os.getcwd())\nprint(open('a.txt').read(), os.path.dirname(f.name) == os.getcwd())"
    )
    result = sandbox.run([code])
    assert result.error is None, result
    workdir, line = result.stdout.splitlines()
    assert line == "ok True"
    assert not os.path.exists(workdir)
    # Each execution gets a fresh directory.
    assert sandbox.run(["import os\nprint(os.path.exists('a.txt'))"]).stdout == "False\n"


def test_host_environment_secrets_not_inherited():
    os.environ["SVPO_SANDBOX_TEST_SECRET"] = "hunter2"
    try:
        with PythonSandbox(timeout_s=TIMEOUT_S, num_workers=1) as box:
            result = box.run(["import os\nprint(sorted(os.environ))"])
            assert "SVPO_SANDBOX_TEST_SECRET" not in result.stdout
            assert "PATH" in result.stdout
            assert (
                "hunter2"
                not in box.run(["import os\nprint(os.environ.get('SVPO_SANDBOX_TEST_SECRET'))"]).stdout
            )
            # Nor through /proc: the host's (and the worker's) environment files are refused.
            host = os.getpid()
            for code in (
                f"open('/proc/{host}/environ').read()",
                "open(f'/proc/{__import__(\"os\").getppid()}/environ').read()",
            ):
                result = box.run([code])
                assert result.error is not None and result.error.startswith("PermissionError"), result
    finally:
        del os.environ["SVPO_SANDBOX_TEST_SECRET"]


# --------------------------------------------------------------------------- lifecycle
def _is_gone_or_zombie_free(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "X"
    except FileNotFoundError:
        return True


def _host_zombies() -> list[int]:
    zombies = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().split(")")[-1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            zombies.append(int(entry))
    return zombies


def test_worker_killed_from_outside_is_replaced():
    with PythonSandbox(timeout_s=TIMEOUT_S, num_workers=1) as box:
        assert box.run(["print(1)"]).stdout == "1\n"
        (pid,) = box.worker_pids
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
        first = box.run(["print(2)"])
        # The execution on the dead worker is reported as a sandbox error, then a new worker serves.
        assert first.stdout == "2\n" or first.error.startswith("SandboxError")
        assert box.run(["print(3)"]).stdout == "3\n"
        assert box.worker_pids != [pid]


def test_close_leaves_no_processes_or_files():
    box = PythonSandbox(timeout_s=TIMEOUT_S, num_workers=2)
    box.warmup()
    results = box.run_many([["import time\ntime.sleep(0.05)\nprint(1)"]] * 4)
    assert [r.stdout for r in results] == ["1\n"] * 4
    pids = box.worker_pids
    assert len(pids) == 2
    base_dir = box._base_dir
    box.close()
    box.close()  # idempotent
    assert all(_is_gone_or_zombie_free(pid) for pid in pids)
    assert _host_zombies() == []
    assert not os.path.exists(base_dir)
    with pytest.raises(RuntimeError, match="closed"):
        box.run(["print(1)"])


def test_limits_cannot_be_lifted_and_group_cannot_be_joined(sandbox):
    result = sandbox.run(["import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))"])
    assert result.error.startswith("PermissionError")
    # The snippet runs in its own session: it cannot join the worker's process group to kill it.
    result = sandbox.run(["import os\nos.setpgid(0, os.getpgid(os.getppid()))"])
    assert result.error.startswith("PermissionError"), result
    assert_pool_healthy(sandbox)


def test_host_home_unreadable_but_python_and_own_proc_readable(sandbox):
    home = os.path.realpath(os.path.expanduser("~"))
    with tempfile.NamedTemporaryFile("w", dir=home, prefix=".svpo-sandbox-test-", suffix=".token") as token:
        token.write("hunter2")
        token.flush()
        result = sandbox.run([f"print(open({token.name!r}).read())"])
        assert result.error.startswith("PermissionError") and "hunter2" not in result.stdout, result
    code = (
        "import os, json, fractions\nprint(open('/proc/self/status').read().split()[0], len(json.dumps([1])))"
    )
    assert sandbox.run([code]) == ExecResult("Name: 3\n", None, False)


def test_results_stay_small_and_valid_text(sandbox):
    result = sandbox.run(["raise ValueError('e' * 100000)"])
    assert result.error.startswith("ValueError: eee") and result.error.endswith("... [error truncated]")
    assert len(result.error) < 1100
    assert sandbox.run(["print('a\\ud800b')"]).stdout == "a?b\n"
    assert sandbox.run(["print('π ≈ 3.14159')"]).stdout == "π ≈ 3.14159\n"


def test_file_count_and_size_capped():
    with PythonSandbox(timeout_s=5, num_workers=1, max_file_mb=1, max_write_opens=5) as box:
        many = "for i in range(10):\n    open(f'f{i}.txt', 'w').write('x')"
        assert box.run([many]).error.startswith("PermissionError")
        big = "open('big.bin', 'wb').write(b'x' * (2 * 1024 ** 2))"
        assert box.run([big]).error == "OSError: [Errno 27] File too large"


def test_forgotten_sandbox_closed_at_exit(tmp_path):
    # A script that never calls close(): atexit must stop the workers and remove the directories.
    script = (
        "import json, sys\nfrom svpo_trl.sandbox import PythonSandbox\n"
        "box = PythonSandbox(num_workers=2)\nbox.warmup()\n"
        "print(json.dumps([box.worker_pids, box._base_dir, box.run(['print(6 * 7)']).stdout]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pids, base_dir, stdout = json.loads(done.stdout)
    assert stdout == "42\n" and len(pids) == 2
    time.sleep(0.1)
    assert all(_is_gone_or_zombie_free(pid) for pid in pids)
    assert not os.path.exists(base_dir)


def test_waiting_child_killed_from_outside_is_replaced():
    # Each worker forks its next child ahead of the request; if that child dies, the run still succeeds.
    with PythonSandbox(timeout_s=TIMEOUT_S, num_workers=1) as box:
        assert box.run(["print(1)"]).stdout == "1\n"
        (worker,) = box.worker_pids
        time.sleep(0.05)
        with open(f"/proc/{worker}/task/{worker}/children") as f:
            (waiting,) = [int(pid) for pid in f.read().split()]
        os.kill(waiting, signal.SIGKILL)
        time.sleep(0.05)
        assert box.run(["x = 2", "x * 21"]) == ExecResult("42", None, False)
        assert box.worker_pids == [worker]


def test_close_during_a_run_is_prompt_and_the_run_gets_a_result():
    box = PythonSandbox(timeout_s=30, num_workers=1)
    box.warmup()
    results: list[ExecResult] = []
    thread = threading.Thread(target=lambda: results.append(box.run(["import time\ntime.sleep(20)"])))
    thread.start()
    time.sleep(0.3)
    start = time.monotonic()
    box.close()
    thread.join(timeout=10)
    assert time.monotonic() - start < 5
    assert not thread.is_alive()
    (result,) = results
    assert result.error.startswith("SandboxError")
    assert _host_zombies() == []


def test_no_descriptor_or_directory_leaks(sandbox):
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    sandbox.run_many([["print(0)"]] * 4)
    before = open_fds()
    mixed = [["print(1)"], ["1 / 0"], ["import os\nos._exit(1)"], ["open('f.txt', 'w').write('x')"]] * 10
    results = sandbox.run_many(mixed)
    assert [r.stdout for r in results[:4]] == ["1\n", "", "", "1"]  # write() returned 1
    assert open_fds() == before
    # Only the waiting children's fresh directories remain, at most one per worker (40 if leaking).
    assert len(os.listdir(sandbox._base_dir)) <= len(sandbox.worker_pids)


def test_forked_copy_refuses_and_leaves_the_parents_workers_alone(sandbox):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            sandbox.run(["print(1)"])
        except RuntimeError as exc:
            code = 3 if "another process" in str(exc) else 4
        sandbox.close()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3
    assert_pool_healthy(sandbox)
