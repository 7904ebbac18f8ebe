"""Tests for taskprune.evaluate.sandbox: correct programs pass, everything hostile is contained.

Every hostile case runs twice: with the optional unshare(1) namespace layer (where the
machine allows it) and without it, so the in-process containment is tested on its own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from taskprune.evaluate import sandbox
from taskprune.evaluate.sandbox import Limits, SandboxResult, run_many, run_program

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox targets Linux")

PROMPT = '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """ Check if in given list of numbers, are any two numbers closer to each other than
    given threshold.
    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)
    False
    """
'''
GOOD_COMPLETION = """    for i, a in enumerate(numbers):
        for j, b in enumerate(numbers):
            if i != j and abs(a - b) < threshold:
                return True
    return False
"""
TEST = """

METADATA = {'author': 'jt', 'dataset': 'test'}


def check(candidate):
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False
    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True
    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True
"""


def humaneval(completion: str) -> str:
    """Assemble a program the way HumanEval does."""
    return PROMPT + completion + "\n" + TEST + "\ncheck(has_close_elements)\n"


GOOD = humaneval(GOOD_COMPLETION)
# A "completion" that defines the function correctly, then appends hostile code: every
# hostile case below is followed by the real tests, made to fail, so a contained attack
# can only ever produce passed=False.
FAILING_TESTS = "\nassert has_close_elements([1.0, 1.05], 0.1) is False, 'tests failed'\n"


def hostile(code: str) -> str:
    return PROMPT + GOOD_COMPLETION + "\n" + code + "\n" + TEST + FAILING_TESTS


@pytest.fixture(params=[True, False], ids=["namespaces", "hook-only"])
def run(request: pytest.FixtureRequest) -> Callable[..., SandboxResult]:
    """run_program, with and without the optional namespace layer."""

    def _run(program: str, timeout_s: float = 3.0, limits: Limits = Limits()) -> SandboxResult:
        return sandbox._run_program(program, timeout_s, limits, use_namespaces=request.param)

    return _run


@pytest.fixture
def canary() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process that hostile programs try to kill; it must survive."""
    # Its own session, so that even a failed killpg() test could not reach pytest's group.
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )
    yield proc
    proc.kill()
    proc.wait()


def assert_contained(
    result: SandboxResult,
    run: Callable[..., SandboxResult],
    statuses: tuple[str, ...] = ("failed",),
) -> None:
    """The hostile program did not pass, and the harness still works afterwards."""
    assert result.passed is False, result
    assert result.status in statuses, result
    after = run(GOOD)
    assert after.passed and after.status == "passed", after


# ------------------------------------------------------------------------------------
# Ordinary programs
# ------------------------------------------------------------------------------------


def test_correct_humaneval_solution_passes(run: Callable[..., SandboxResult]) -> None:
    result = run(GOOD)
    assert result.passed is True
    assert result.status == "passed"
    assert result.returncode == 0
    assert result.wall_s < 3.0


def test_failing_assert_fails_with_traceback(run: Callable[..., SandboxResult]) -> None:
    result = run(humaneval("    return False\n"))
    assert result.passed is False
    assert result.status == "failed"
    assert result.returncode == 1
    assert "AssertionError" in result.stderr
    assert "program.py" in result.stderr


def test_mbpp_style_program() -> None:
    code = "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n"
    tests = "assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == {4, 5}\n"
    assert run_program(code + tests).passed is True
    assert run_program(code + "assert similar_elements((1,), (2,)) == (1,)\n").passed is False


def test_syntax_error_and_exception_fail() -> None:
    assert run_program(humaneval("    return (\n")).status == "failed"
    assert run_program(humaneval("    raise ValueError('nope')\n")).status == "failed"


def test_common_stdlib_usage_passes() -> None:
    program = """
import collections, dataclasses, decimal, fractions, functools, heapq, inspect, itertools
import json, logging, math, re, string, tempfile
from typing import List, NamedTuple

Point = collections.namedtuple('Point', 'x y')
class Pair(NamedTuple):
    a: int
    b: int
@dataclasses.dataclass
class Box:
    size: int = 1
logging.getLogger('x').warning('logging works')
assert Point(1, 2).y == 2 and Pair(1, 2).b == 2 and Box().size == 1
assert inspect.signature(lambda a, b=1: None).parameters['b'].default == 1
assert re.findall(r'\\d+', 'a1b22') == ['1', '22'] and math.gcd(12, 18) == 6
assert heapq.nsmallest(2, [5, 1, 3]) == [1, 3] and list(itertools.accumulate([1, 2])) == [1, 3]
assert json.loads(json.dumps({'a': [1]})) == {'a': [1]}
assert fractions.Fraction(1, 3) * 3 == 1 and decimal.Decimal('0.1') * 3 == decimal.Decimal('0.3')
with open('scratch.txt', 'w') as handle:          # the sandbox directory is writable
    handle.write('ok')
assert open('scratch.txt').read() == 'ok'
with tempfile.NamedTemporaryFile() as handle:     # so is TMPDIR
    handle.write(b'ok')
print('done', end='')
"""
    result = run_program(program)
    assert result.passed, result
    assert result.stdout == "done"
    assert "logging works" in result.stderr


def test_environment_is_minimal_and_stdin_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKPRUNE_TEST_SECRET", "hunter2")
    program = """
import os, sys
print(sorted(os.environ))
print(os.environ['HOME'].startswith(os.getcwd()), os.environ['TMPDIR'].startswith(os.getcwd()))
print(repr(sys.stdin.read()))
"""
    result = run_program(program)
    assert result.passed, result
    names, home_tmp, stdin = result.stdout.splitlines()
    assert "TASKPRUNE_TEST_SECRET" not in names
    assert set(eval(names)) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL"}
    assert home_tmp == "True True"
    assert stdin == "''"


def test_tampering_after_the_tests_keeps_a_pass(run: Callable[..., SandboxResult]) -> None:
    """The runner's own completion path does not depend on anything the program can rebind."""
    tail = """
import builtins, gc, io, os, sys
sys.stdout = io.StringIO()
sys.setrecursionlimit(50)
builtins.next = builtins.BaseException = None
os.write = os._exit = sys.audit = None
gc.enable()
"""
    result = run(GOOD + tail)
    assert result.passed, result


def test_sandbox_directory_is_removed() -> None:
    result = run_program("import os\nprint(os.getcwd())\nopen('left.txt', 'w').write('x')\n")
    assert result.passed, result
    directory = Path(result.stdout.strip())
    assert directory.name.startswith("taskprune-sandbox-")
    assert not directory.exists()


def test_max_processes_allows_exactly_that_many_forks() -> None:
    program = """
import os
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
try:
    os.fork()
except PermissionError:
    print('second fork refused')
else:
    raise SystemExit('second fork was allowed')
"""
    result = run_program(program, limits=Limits(max_processes=1))
    assert result.passed, result
    assert "second fork refused" in result.stdout
    assert run_program(program).passed is False  # the default allows no fork at all


def test_harness_problem_is_reported_as_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    result = run_program(GOOD)
    assert result.passed is False
    assert result.status == "error"


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError):
        run_program(GOOD, timeout_s=0)
    with pytest.raises(ValueError):
        run_program(GOOD, limits=Limits(memory_mb=0))
    with pytest.raises(ValueError):
        run_many([GOOD], workers=0)


def test_run_many_keeps_order_and_runs_in_parallel() -> None:
    programs = [f"import time\ntime.sleep(0.8)\nprint({i})\n" for i in range(4)]
    programs.insert(2, "assert False\n")
    started = time.monotonic()
    results = run_many(programs, workers=2)
    elapsed = time.monotonic() - started
    assert [r.passed for r in results] == [True, True, False, True, True]
    assert [r.stdout.strip() for r in results] == ["0", "1", "", "2", "3"]
    assert elapsed < 4 * 0.8  # serial execution would need at least 3.2 s
    assert run_many([]) == []


# ------------------------------------------------------------------------------------
# Hostile programs
# ------------------------------------------------------------------------------------


def test_infinite_loop_times_out(run: Callable[..., SandboxResult]) -> None:
    started = time.monotonic()
    result = run(hostile("while True:\n    pass\n"), timeout_s=1.0)
    assert time.monotonic() - started < 1.0 + 2.0
    assert result.status == "timeout" and result.wall_s < 3.0
    assert_contained(result, run, ("timeout",))


def test_sleeping_program_times_out(run: Callable[..., SandboxResult]) -> None:
    result = run(hostile("import time\ntime.sleep(60)\n"), timeout_s=0.5)
    assert result.wall_s < 2.5
    assert_contained(result, run, ("timeout",))


@pytest.mark.parametrize(
    "code",
    [
        "import os\nwhile True:\n    os.fork()\n",
        "import subprocess\nsubprocess.Popen(['sleep', '30'])\n",
        "import subprocess\nsubprocess.run([sys.executable, '-c', 'print(1)'])\n",
        "import os\nos.system('sleep 30')\n",
        "import os\nos.execv('/bin/sh', ['sh', '-c', 'exit 0'])\n",
        "import os\nos.posix_spawn('/bin/true', ['true'], {})\n",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()\n",
        "import _posixsubprocess\n_posixsubprocess.fork_exec()\n",
        "import pty\npty.fork()\n",
    ],
    ids=["fork-loop", "popen", "subprocess-run", "system", "execv", "posix_spawn",
         "multiprocessing", "posixsubprocess", "pty"],
)
def test_process_creation_is_refused(run: Callable[..., SandboxResult], code: str) -> None:
    result = run(hostile("import sys\n" + code))
    assert "not allowed" in result.stderr
    assert_contained(result, run)


@pytest.mark.parametrize(
    ("code", "limits"),
    [
        ("x = bytearray(10**10)\n", Limits()),
        # Really touches the memory, so use a smaller cap (and a generous timeout): how fast
        # pages can be faulted in depends on the host, the containment does not.
        ("x = []\nwhile True:\n    x.append(' ' * 10**6)\n", Limits(memory_mb=256)),
    ],
    ids=["bytearray", "growing-list"],
)
def test_memory_bombs_fail(
    run: Callable[..., SandboxResult], code: str, limits: Limits
) -> None:
    result = run(hostile(code), timeout_s=10.0, limits=limits)
    assert "MemoryError" in result.stderr
    assert_contained(result, run)


@pytest.mark.parametrize(
    "template",
    [
        "open({path!r}, 'w').write('escaped')\n",
        "import os\nos.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))\n",
        "from pathlib import Path\nPath({path!r}).write_text('escaped')\n",
        "import os\nos.symlink(os.path.dirname({path!r}), 'link')\n"
        "open(os.path.join('link', os.path.basename({path!r})), 'w').write('escaped')\n",
        "import os\nrel = os.path.relpath({path!r})\nopen(rel, 'w').write('escaped')\n",
        "import os\nos.chdir('/tmp')\nopen(os.path.basename({path!r}), 'w').write('escaped')\n",
        "import shutil\nshutil.copy('/etc/hostname', {path!r})\n",
        "import os\nopen('inside', 'w').write('x')\nos.rename('inside', {path!r})\n",
        "import os\nos.mkdir({path!r})\n",
        "import os\nos.mkfifo({path!r})\n",
    ],
    ids=["open", "os.open", "pathlib", "symlink", "relative", "chdir", "shutil.copy",
         "rename", "mkdir", "mkfifo"],
)
def test_writing_outside_the_sandbox_is_refused(
    run: Callable[..., SandboxResult], template: str
) -> None:
    target = Path(f"/tmp/taskprune_escape_{uuid.uuid4().hex}")
    try:
        result = run(hostile(template.format(path=str(target))))
        assert not target.exists() and not target.is_symlink()
        assert "not allowed" in result.stderr
        assert_contained(result, run)
    finally:
        if target.is_dir():
            target.rmdir()
        elif target.exists() or target.is_symlink():
            target.unlink()


def test_existing_files_outside_are_not_modified(
    run: Callable[..., SandboxResult], tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    victim.chmod(0o644)
    attempts = [
        f"open({str(victim)!r}, 'a').write('x')",
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.chmod({str(victim)!r}, 0o777)",
        f"import os\nos.truncate({str(victim)!r}, 0)",
        f"import os\nos.link({str(victim)!r}, 'hardlink')\nopen('hardlink', 'w').write('x')",
        f"import os\nos.fchmod(os.open({str(victim)!r}, os.O_RDONLY), 0o777)",
    ]
    for code in attempts:
        result = run(hostile(code))
        assert result.passed is False and "not allowed" in result.stderr, (code, result)
    assert victim.read_text() == "original"
    assert victim.stat().st_mode & 0o777 == 0o644
    assert run(GOOD).passed


@pytest.mark.parametrize(
    "code",
    [
        "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
        "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
        "import socket\nsocket.getaddrinfo('localhost', {port})\n",
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)\n",
        "import socket\nsocket.socket(socket.AF_UNIX).connect('/run/x.sock')\n",
    ],
    ids=["connect", "create_connection", "getaddrinfo", "urllib", "unix"],
)
def test_network_is_refused(run: Callable[..., SandboxResult], code: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        result = run(hostile(code.format(port=port)))
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
    assert "not allowed" in result.stderr
    assert_contained(result, run)


@pytest.mark.parametrize(
    "template",
    [
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
        "import os, signal\nos.kill({pid}, signal.SIGKILL)\n",
        "import os, signal\nos.killpg({pid}, signal.SIGKILL)\n",  # canary leads its group
        "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({pid}), signal.SIGKILL)\n",
        "import _imp, importlib.machinery, signal\n"
        "posix = _imp.create_builtin(importlib.machinery.ModuleSpec('posix', None))\n"
        "signal.pidfd_send_signal(posix.pidfd_open({pid}), signal.SIGKILL)\n",
    ],
    ids=["parent", "canary", "killpg", "pidfd", "fresh-posix"],
)
def test_signalling_other_processes_is_refused(
    run: Callable[..., SandboxResult], canary: subprocess.Popen[bytes], template: str
) -> None:
    result = run(hostile(template.format(pid=canary.pid)))
    time.sleep(0.05)
    assert canary.poll() is None, "the canary process was killed"
    assert os.getpid() > 0  # still here
    assert "not allowed" in result.stderr
    assert_contained(result, run)


def test_stdout_flood_is_capped_and_fast(run: Callable[..., SandboxResult]) -> None:
    limits = Limits(output_bytes=10_000)
    started = time.monotonic()
    result = run(hostile("while True:\n    print('x' * 10**6)\n"), timeout_s=1.0, limits=limits)
    assert time.monotonic() - started < 3.0
    assert len(result.stdout) == 10_000
    assert_contained(result, run, ("timeout",))
    # A finite flood (50 MB on stdout and stderr) from a correct program still passes.
    flood = "import sys\nfor _ in range(50):\n    print('x' * 10**6)\n    sys.stderr.write('y' * 10**6)\n"
    result = run(flood + GOOD, limits=limits)
    assert result.passed, result
    assert result.stdout == "x" * 10_000 and result.stderr == "y" * 10_000


@pytest.mark.parametrize(
    "code",
    [
        "import sys\nsys.exit(0)\n",
        "raise SystemExit\n",
        "raise SystemExit(0)\n",
        "exit()\n",
        "quit(0)\n",
        "import os\nos._exit(0)\n",
        "import os, sys\nsys.stdout.flush()\nos.close(1)\nos.close(2)\nos._exit(0)\n",
        "import threading, os, time\n"
        "threading.Thread(target=lambda: os._exit(0)).start()\ntime.sleep(1)\n",
        "import signal, os\nsignal.signal(signal.SIGTERM, lambda *a: os._exit(0))\nos.kill(os.getpid(), signal.SIGTERM)\n",
    ],
    ids=["sys.exit", "SystemExit", "SystemExit-0", "exit", "quit", "os._exit",
         "close-fds-exit", "thread-exit", "self-signal"],
)
def test_exiting_before_the_tests_is_not_a_pass(
    run: Callable[..., SandboxResult], code: str
) -> None:
    assert_contained(run(hostile(code)), run)


@pytest.mark.parametrize(
    "code",
    [
        "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n",
        "import builtins\nbuiltins.print = lambda *a, **k: None\nbuiltins.exit = lambda *a: None\n",
        "import builtins\n_real = builtins.__import__\n"
        "builtins.__import__ = lambda name, *a, **k: _real(name, *a, **k)\n",
        "import builtins\nbuiltins.BaseException = int\nbuiltins.Exception = int\n",
        "import builtins, sys\nbuiltins.isinstance = lambda *a: True\nbuiltins.len = lambda *a: 0\n"
        "sys.excepthook = lambda *a: None\nsys.stderr = open('err.txt', 'w')\n",
        "import os, sys\nos._exit = lambda code: None\nos.write = lambda *a: 0\nsys.exit = lambda *a: None\n",
        "import sys\nsys.setrecursionlimit(10)\n",
    ],
    ids=["AssertionError", "print-exit", "__import__", "BaseException", "isinstance-len",
         "os-functions", "recursionlimit"],
)
def test_overriding_builtins_does_not_help(run: Callable[..., SandboxResult], code: str) -> None:
    assert_contained(run(hostile(code)), run)


@pytest.mark.parametrize(
    "code",
    [
        "import atexit, os\natexit.register(os._exit, 0)\n",
        "import atexit, sys\natexit.register(lambda: sys.stdout.write('all tests passed'))\n",
        "import atexit, os\n"
        "atexit.register(lambda: [os.write(fd, b'R' + b'0' * 32) for fd in range(3, 64)"
        " if os.path.exists(f'/dev/fd/{fd}')])\n",
    ],
    ids=["os._exit", "fake-message", "fake-marker"],
)
def test_atexit_tricks_do_not_pass(run: Callable[..., SandboxResult], code: str) -> None:
    assert_contained(run(hostile(code)), run)


@pytest.mark.parametrize(
    "code",
    [
        # resume the runner's vault from user code, then leave
        "import sys, os\nf = sys._getframe()\nwhile f is not None:\n"
        "    v = f.f_locals.get('vault')\n    if v is not None:\n        next(v, None)\n"
        "    f = f.f_back\nos._exit(0)\n",
        "import sys\nprint(sys._getframe(1).f_locals['vault'].gi_frame.f_locals)\n",
        "import gc\n[o for o in gc.get_objects() if isinstance(o, bytes) and len(o) == 32]\n",
        "import os\nfor fd in range(3, 256):\n    try:\n        os.write(fd, b'R' + os.urandom(16).hex().encode())\n"
        "    except OSError:\n        pass\nos._exit(0)\n",
        "open('/proc/self/mem', 'rb')\n",
        "import ctypes\n",
        "import sys\nsys.settrace(lambda *a: None)\n",
    ],
    ids=["resume-vault", "gi_frame", "gc-scan", "write-marker-fds", "proc-mem", "ctypes",
         "settrace"],
)
def test_completion_marker_cannot_be_forged(
    run: Callable[..., SandboxResult], code: str
) -> None:
    assert_contained(run(hostile(code)), run)


def test_namespace_probe_never_required(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without unshare(1) on PATH the sandbox still works (the hook does the containing)."""
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    assert sandbox._isolation_prefix() == []
    assert run_program(GOOD).passed
    assert run_program(hostile("import os\nos.fork()\n")).passed is False
