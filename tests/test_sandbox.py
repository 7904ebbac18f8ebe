"""Tests for taskprune.evaluate.sandbox: correct programs pass, everything hostile is contained.

The original hostile cases run twice: with the kernel layers (required: the test fails if
this machine lacks them) and without them, so the in-process audit hook is tested on its
own. The kernel-layer cases further down run with the audit hook switched off as well, so
that they show the containment does not depend on it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from taskprune.evaluate import sandbox
from taskprune.evaluate.sandbox import (
    Limits,
    SandboxResult,
    SandboxUnavailable,
    run_many,
    run_program,
)

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
    """run_program with the kernel layers (required), and with the audit hook alone."""

    def _run(program: str, timeout_s: float = 3.0, limits: Limits = Limits()) -> SandboxResult:
        return sandbox._run_program(
            program, timeout_s, limits, use_namespaces=request.param,
            require_isolation=request.param,
        )

    _run.kernel = request.param  # type: ignore[attr-defined]
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
    # With the kernel layers, pty.fork() already fails for want of /dev/ptmx (no ptys in
    # the minimal /dev), before the hook is asked; alone, the hook must refuse.
    if not (run.kernel and "out of pty devices" in result.stderr):  # type: ignore[attr-defined]
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
        assert result.passed is False, (code, result)
        if run.kernel:  # type: ignore[attr-defined]  # /tmp/pytest-* is not even visible
            assert "not allowed" in result.stderr or "No such file" in result.stderr
        else:
            assert "not allowed" in result.stderr, (code, result)
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



# ------------------------------------------------------------------------------------
# Isolation layers: probed, required by default, reported
# ------------------------------------------------------------------------------------

UNPRIVILEGED = "unprivileged-uid" if os.geteuid() == 0 else "user-ns"
FULL_LAYERS = (UNPRIVILEGED, "read-only-fs", "pid-ns", "net-ns", "ipc-ns", "death-signal",
               "disk-quota", "no-new-privs", "rlimits", "audit-hook")


def test_full_isolation_is_present_here() -> None:
    """This project targets Linux with util-linux: every kernel layer must be in effect."""
    found = sandbox.isolation()
    assert found.layers == FULL_LAYERS, found.summary
    assert found.missing == () and found.required_missing == () and found.complete
    assert "MISSING" not in found.summary
    assert sandbox.isolation() == found  # a frozen value; the probe's result is cached


def test_namespace_probe_never_required(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without unshare(1)/setpriv(1) the kernel layers are reported missing and required
    runs refuse clearly; runs that do not require them still work (the hook contains)."""
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    found = sandbox.isolation()
    for layer in (UNPRIVILEGED, "read-only-fs", "pid-ns", "net-ns", "death-signal"):
        assert layer in found.missing and layer in found.required_missing
    assert not found.complete and "MISSING" in found.summary
    assert found.layers == ("rlimits", "audit-hook")
    with pytest.raises(SandboxUnavailable, match="--no-require-isolation") as info:
        run_program(GOOD)
    assert "read-only-fs" in str(info.value) and isinstance(info.value, RuntimeError)
    with pytest.raises(SandboxUnavailable):
        run_many([GOOD, GOOD])
    assert run_program(GOOD, require_isolation=False).passed
    assert run_many([GOOD], require_isolation=False)[0].passed
    assert run_program(hostile("import os\nos.fork()\n"), require_isolation=False).passed is False


# ------------------------------------------------------------------------------------
# Kernel-enforced containment, with and without the audit hook
# ------------------------------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["kernel-only", "kernel+hook"])
def contained(request: pytest.FixtureRequest) -> Callable[..., SandboxResult]:
    """run_program with the kernel layers required; the audit hook off, then on."""
    assert sandbox.isolation().complete, sandbox.isolation().summary

    def _run(program: str, timeout_s: float = 5.0, limits: Limits = Limits()) -> SandboxResult:
        return sandbox._run_program(
            program, timeout_s, limits, audit_hook=request.param, require_isolation=True
        )

    _run.hook = request.param  # type: ignore[attr-defined]
    return _run


@pytest.fixture
def visible_dir() -> Iterator[Path]:
    """A host directory the sandbox can see (read-only), unlike pytest's under /tmp."""
    try:
        path = Path(tempfile.mkdtemp(prefix=".taskprune-sandbox-test-", dir=sys.prefix))
    except OSError as exc:
        pytest.skip(f"needs a writable sys.prefix ({sys.prefix}) for a target that is "
                    f"visible inside the sandbox: {exc}")
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def snapshot(*roots: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry under ``roots`` with its mode and (for files) contents."""
    found: dict[str, tuple[int, bytes]] = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))]:
            info = path.lstat()
            data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
            found[str(path)] = (info.st_mode, data)
    return found


def victims(*dirs: Path) -> dict[str, tuple[int, bytes]]:
    """A file and a subdirectory in each of ``dirs``, for hostile programs to attack."""
    for directory in dirs:
        (directory / "victim.txt").write_text("original")
        (directory / "victim.txt").chmod(0o644)
        (directory / "subdir").mkdir(exist_ok=True)
    return snapshot(*dirs)


def outcomes(result: SandboxResult) -> dict[str, str]:
    """The ``name=outcome`` lines a probing program printed."""
    lines = [line.partition("=") for line in result.stdout.splitlines() if "=" in line]
    return {name: outcome for name, _, outcome in lines}


# Every way to ask for a descriptor of a directory, then every *at use of one.
ATTEMPT = '''
import errno, os

def attempt(name, call):
    try:
        call()
    except OSError as exc:
        print(name + "=" + ("hook" if "not allowed" in str(exc) else errno.errorcode.get(exc.errno, "?")))
    except Exception as exc:
        print(name + "=" + type(exc).__name__)
    else:
        print(name + "=DONE")
'''

DIR_FLAGS = {
    "O_RDONLY": os.O_RDONLY,
    "O_RDONLY|O_APPEND": os.O_RDONLY | os.O_APPEND,
    "O_RDONLY|O_APPEND|O_NONBLOCK": os.O_RDONLY | os.O_APPEND | os.O_NONBLOCK,
    "O_RDONLY|O_NOFOLLOW|O_CLOEXEC": os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
    "O_DIRECTORY": os.O_DIRECTORY,
    "O_DIRECTORY|O_APPEND": os.O_DIRECTORY | os.O_APPEND,
    "O_PATH": os.O_PATH,
    "O_PATH|O_DIRECTORY": os.O_PATH | os.O_DIRECTORY,
    "O_PATH|O_APPEND": os.O_PATH | os.O_APPEND,
    "O_TMPFILE|O_RDWR": os.O_TMPFILE | os.O_RDWR,
    "O_TMPFILE|O_WRONLY": os.O_TMPFILE | os.O_WRONLY,
}


def at_calls_program(directory: Path, flags: int) -> str:
    """Get a descriptor of ``directory`` with ``flags``, then write through it with *at."""
    return ATTEMPT + textwrap.dedent(f'''
        fd = -1
        def get():
            global fd
            fd = os.open({str(directory)!r}, {flags})
        attempt("getfd", get)
        if fd < 0:
            fd = 0  # what is left to try: a descriptor that is not a directory
        attempt("open-dir_fd", lambda: os.close(os.open("escaped", os.O_WRONLY | os.O_CREAT, dir_fd=fd)))
        attempt("builtin-open-dir_fd", lambda: open("escaped2", "w", opener=lambda p, f: os.open(p, f, dir_fd=fd)).write("x"))
        attempt("append-dir_fd", lambda: open("victim.txt", "a", opener=lambda p, f: os.open(p, f, dir_fd=fd)).write("x"))
        attempt("mkdir-dir_fd", lambda: os.mkdir("escaped_dir", dir_fd=fd))
        attempt("rename-dir_fd", lambda: os.rename("victim.txt", "renamed", src_dir_fd=fd, dst_dir_fd=fd))
        attempt("unlink-dir_fd", lambda: os.unlink("victim.txt", dir_fd=fd))
        attempt("rmdir-dir_fd", lambda: os.rmdir("subdir", dir_fd=fd))
        attempt("symlink-dir_fd", lambda: os.symlink("/etc/passwd", "escaped_link", dir_fd=fd))
        attempt("chmod-dir_fd", lambda: os.chmod("victim.txt", 0o777, dir_fd=fd))
        attempt("utime-dir_fd", lambda: os.utime("victim.txt", (0, 0), dir_fd=fd))
        attempt("fchdir", lambda: (os.fchdir(fd), open("escaped3", "w").write("x")))
        attempt("tmpfile-link", lambda: os.link("/proc/self/fd/%d" % fd, "escaped4"))
    ''')


@pytest.mark.parametrize("flags", list(DIR_FLAGS))
def test_directory_descriptors_are_refused_by_the_hook(
    run: Callable[..., SandboxResult], visible_dir: Path, tmp_path: Path, flags: str
) -> None:
    """The audit hook alone: no directory descriptor for any flags, no dir_fd= use."""
    for target in (visible_dir, tmp_path):
        before = victims(target)
        result = run(hostile(at_calls_program(target, DIR_FLAGS[flags])))
        seen = outcomes(result)
        assert snapshot(target) == before, seen
        assert "DONE" not in seen.values(), seen
        if target == visible_dir or not run.kernel:  # type: ignore[attr-defined]
            assert seen["getfd"] == "hook", seen
        for name in ("mkdir-dir_fd", "rename-dir_fd", "unlink-dir_fd", "rmdir-dir_fd",
                     "symlink-dir_fd", "chmod-dir_fd", "utime-dir_fd"):
            assert seen[name] == "hook", (name, seen)
        assert_contained(result, run)


@pytest.mark.parametrize("flags", list(DIR_FLAGS))
def test_directory_descriptors_cannot_write_outside(
    contained: Callable[..., SandboxResult], visible_dir: Path, tmp_path: Path, flags: str
) -> None:
    """Without the hook the program gets real directory descriptors; the kernel holds."""
    before = victims(visible_dir, tmp_path)
    for target in (visible_dir, tmp_path):
        result = contained(hostile(at_calls_program(target, DIR_FLAGS[flags])))
        seen = outcomes(result)
        writes = {name: outcome for name, outcome in seen.items() if name != "getfd"}
        assert len(writes) == 12 and "DONE" not in writes.values(), seen
        assert result.passed is False
    assert snapshot(visible_dir, tmp_path) == before
    if not contained.hook and flags in ("O_RDONLY", "O_RDONLY|O_APPEND", "O_PATH"):  # type: ignore[attr-defined]
        assert seen["getfd"] == "ENOENT"  # tmp_path: /tmp is private in the sandbox


SYMLINK_RACE = '''
import os, threading, time
# "cur" alternates between a real directory and one whose "b" is a symlink to the outside.
# Only directories are renamed, all inside the sandbox, so the hook allows every step;
# it resolves "cur/b/NAME" at its check, and the kernel may open it after a swap.
os.makedirs("cur/b")
os.mkdir("evil")
os.symlink({outside!r}, "evil/b")
stop = time.monotonic() + 1.0
swaps = 0
def swapper():
    global swaps
    while time.monotonic() < stop:
        try:
            os.rename("cur", "safe")
            os.rename("evil", "cur")
            os.rename("cur", "evil")
            os.rename("safe", "cur")
            swaps += 1
        except OSError:
            pass
thread = threading.Thread(target=swapper)
thread.start()
attempts = writes = 0
while time.monotonic() < stop:
    attempts += 1
    try:
        with open("cur/b/{name}", "a") as handle:
            handle.write("import os; os.system('touch /tmp/pwned')\\n")
        writes += 1
    except OSError:
        pass
thread.join()
print("attempts=%d" % attempts)
print("swaps=%d" % swaps)
print("writes=%d" % writes)
'''

HARDLINK_RACE = '''
import os, threading, time
open("decoy", "w").close()
stop = time.monotonic() + 1.0
links = refused = 0
def swapper():
    global links, refused
    while time.monotonic() < stop:
        for source in ({outside!r}, "decoy"):
            try:
                os.link(source, "h.tmp")
                os.replace("h.tmp", "h")
                links += 1
            except OSError:
                refused += 1
thread = threading.Thread(target=swapper)
thread.start()
attempts = 0
while time.monotonic() < stop:
    attempts += 1
    try:
        with open("h", "a") as handle:
            handle.write("pwned\\n")
    except OSError:
        pass
thread.join()
print("attempts=%d" % attempts)
print("links=%d" % links)
print("refused=%d" % refused)
'''


def test_symlink_swap_race_cannot_escape(
    contained: Callable[..., SandboxResult], visible_dir: Path, tmp_path: Path
) -> None:
    """A thread swaps a symlink between an inside directory and an outside one (a pytest
    tmp dir, and a fake site-packages where a .pth would run code) for a second."""
    site = visible_dir / "site-packages"
    site.mkdir(mode=0o755)
    before = victims(visible_dir, tmp_path)
    for outside, name in ((str(site), "evil.pth"), (str(tmp_path), "victim.txt")):
        program = SYMLINK_RACE.format(outside=outside, name=name)
        result = contained(program, timeout_s=10.0, limits=Limits(max_processes=1))
        seen = outcomes(result)
        assert result.passed, result  # the race ran to its end...
        assert int(seen["attempts"]) > 0 and int(seen["swaps"]) > 0, seen
        assert snapshot(visible_dir, tmp_path) == before  # ...and nothing outside changed
        assert not (site / "evil.pth").exists()
    assert not Path("/tmp/pwned").exists()


def test_hardlink_swap_race_cannot_escape(
    contained: Callable[..., SandboxResult], visible_dir: Path, tmp_path: Path
) -> None:
    before = victims(visible_dir, tmp_path)
    for outside in (visible_dir / "victim.txt", tmp_path / "victim.txt"):
        program = HARDLINK_RACE.format(outside=str(outside))
        result = contained(program, timeout_s=10.0, limits=Limits(max_processes=1))
        seen = outcomes(result)
        assert result.passed, result
        assert int(seen["attempts"]) > 0 and int(seen["refused"]) > 0, seen
        assert snapshot(visible_dir, tmp_path) == before
        assert outside.stat().st_nlink == 1  # no link to it was ever made


def test_secrets_outside_cannot_be_read(
    contained: Callable[..., SandboxResult], visible_dir: Path, tmp_path: Path
) -> None:
    """A root-only file (as root: the program runs as uid 65534), and a world-readable
    file in the harness's tmp dir (not visible at all)."""
    secret = f"secret-{uuid.uuid4().hex}"
    root_only = visible_dir / "root-only.txt"
    root_only.write_text(secret)
    root_only.chmod(0o600)
    in_tmp = tmp_path / "harness-tmp.txt"
    in_tmp.write_text(secret)
    in_tmp.chmod(0o644)
    targets = {"harness-tmp": str(in_tmp), "shadow": "/etc/shadow"}
    if os.geteuid() == 0:
        targets["root-only"] = str(root_only)
    program = ATTEMPT + "".join(
        f"attempt({name!r}, lambda: print(open({path!r}).read()))\n"
        for name, path in targets.items()
    ) + "attempt('root-home', lambda: print(sorted(os.listdir('/root'))))\n"
    result = contained(program)
    seen = outcomes(result)
    assert secret not in result.stdout + result.stderr
    assert seen["harness-tmp"] == "ENOENT", seen
    if os.path.exists("/etc/shadow"):
        assert seen["shadow"] == "EACCES" or os.geteuid() != 0, seen
        assert "root:" not in result.stdout
    if os.geteuid() == 0:
        assert seen["root-only"] == "EACCES", seen
        # /root is covered; only the interpreter's tree is bound back, when it lives there
        assert "root-home" in seen and ".bash_history" not in result.stdout


def test_shared_writable_places_are_private_or_read_only(
    contained: Callable[..., SandboxResult],
) -> None:
    token = f"taskprune-escape-{uuid.uuid4().hex}"
    repo = Path(__file__).resolve().parents[1]
    places = ["/tmp", "/var/tmp", "/dev/shm", "/run", "/run/lock", "/etc", "/", str(repo),
              sys.prefix, sysconfig.get_paths()["purelib"], str(Path(sandbox._CHILD).parent)]
    program = ATTEMPT + "".join(
        f"attempt({place!r}, lambda: open({os.path.join(place, token)!r}, 'w').write('x'))\n"
        for place in places
    )
    result = contained(program)
    seen = outcomes(result)
    assert set(seen) == set(places), result
    for place in places:
        assert seen[place] in ("hook", "EROFS", "EACCES", "ENOENT"), (place, seen)
        if not contained.hook:  # type: ignore[attr-defined]
            assert seen[place] in ("EROFS", "ENOENT"), (place, seen)  # read-only or hidden
        assert not os.path.lexists(os.path.join(place, token))


def test_filling_the_disk_hits_the_quota(contained: Callable[..., SandboxResult]) -> None:
    limits = Limits(disk_mb=8, file_size_mb=4)
    program = textwrap.dedent('''
        import errno, os
        chunk = b"x" * (1 << 20)
        total, index, last = 0, 0, None
        while last is None or last == errno.EFBIG:
            last = None
            with open("fill%d" % index, "wb", buffering=0) as handle:
                try:
                    while True:
                        total += handle.write(chunk)
                except OSError as exc:
                    last = exc.errno
            index += 1
        print("errno=" + errno.errorcode[last])
        print("total=%d" % total)
        print("files=%d" % index)
    ''')
    result = contained(program, timeout_s=20.0, limits=limits)
    seen = outcomes(result)
    assert result.passed, result
    assert seen["errno"] == "ENOSPC", seen
    assert int(seen["total"]) <= limits.disk_mb * (1 << 20), seen
    assert int(seen["files"]) >= 2, seen  # single files stopped at RLIMIT_FSIZE (EFBIG)
    assert contained(GOOD).passed  # a fresh quota for the next program


def test_no_network_to_the_host(
    contained: Callable[..., SandboxResult], tmp_path: Path
) -> None:
    unix_path = str(tmp_path / "host.sock")
    with socket.socket() as listener, socket.socket(socket.AF_UNIX) as unix_listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        unix_listener.bind(unix_path)
        os.chmod(unix_path, 0o777)
        unix_listener.listen()
        unix_listener.setblocking(False)
        port = listener.getsockname()[1]
        program = ATTEMPT + textwrap.dedent(f'''
            import socket
            attempt("tcp", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2))
            attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", {port})))
            attempt("unix", lambda: socket.socket(socket.AF_UNIX).connect({unix_path!r}))
            attempt("interfaces", lambda: print("names=" + ",".join(n for _, n in socket.if_nameindex())))
        ''')
        result = contained(program)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
        with pytest.raises(BlockingIOError):
            unix_listener.accept()
    seen = outcomes(result)
    for name in ("tcp", "udp", "unix"):
        assert seen[name] != "DONE", seen
    if not contained.hook:  # type: ignore[attr-defined]
        assert seen["names"] == "lo", seen  # a fresh network namespace, loopback down
        assert seen["tcp"] in ("ENETUNREACH", "ECONNREFUSED", "EADDRNOTAVAIL"), seen


def test_other_processes_cannot_be_signalled(
    contained: Callable[..., SandboxResult], canary: subprocess.Popen[bytes]
) -> None:
    program = ATTEMPT + textwrap.dedent(f'''
        import signal
        attempt("canary", lambda: os.kill({canary.pid}, signal.SIGKILL))
        attempt("harness", lambda: os.kill({os.getpid()}, signal.SIGKILL))
        attempt("group", lambda: os.killpg({canary.pid}, signal.SIGKILL))
        attempt("everyone", lambda: os.kill(-1, signal.SIGKILL))
    ''')
    result = contained(program)
    time.sleep(0.05)
    assert canary.poll() is None, "the canary process was killed"
    seen = outcomes(result)
    if contained.hook:  # type: ignore[attr-defined]
        assert set(seen.values()) == {"hook"}, seen
    else:  # host pids do not exist in the sandbox's PID namespace; kill(-1) stays inside it
        assert seen["canary"] == seen["harness"] == seen["group"] == "ESRCH", seen
    assert contained(GOOD).passed


def _processes() -> dict[int, tuple[int, str, str, bytes]]:
    """pid -> (ppid, state, start time, cmdline) for every process on the host."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_text = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat_text.rpartition(")")[2].split()
        table[int(entry)] = (int(fields[1]), fields[0], fields[19], cmdline)
    return table


def _alive(processes: set[tuple[int, str]], token: bytes) -> list[str]:
    """Those of ``processes`` (pid, start time) still running, and any with ``token``."""
    table = _processes()
    found = []
    for pid, (_, state, started, cmdline) in table.items():
        if state in "ZX":
            continue  # dead, waiting to be reaped
        if (pid, started) in processes or token in cmdline:
            found.append(f"{pid} {cmdline[:120]!r}")
    return found


def _descendants(root: int) -> set[tuple[int, str]]:
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add((child, table[child][2]))
            stack.append(child)
    return found


def _wait_for(condition: Callable[[], object], seconds: float) -> object:
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(0.05)


ESCAPER = '''
import os, time
open("heartbeat", "w").close()
if os.fork() == 0:
    os.setsid()  # out of the harness's process group
    os.execv("/bin/sleep", ["sleep", "1000", "{token}"])
while True:
    with open("heartbeat", "a") as handle:
        handle.write("beat\\n")
    time.sleep(0.05)
'''
SLEEPER = '''
import signal, time
for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(signum, signal.SIG_IGN)
while True:
    with open("heartbeat", "a") as handle:
        handle.write("beat\\n")
    time.sleep(0.05)
'''


def _sandbox_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("taskprune-sandbox-")}


@pytest.mark.parametrize("hook", [False, True], ids=["kernel-only", "kernel+hook"])
def test_nothing_outlives_a_killed_harness(hook: bool) -> None:
    """kill -9 the harness mid-program: every process of the sandbox dies, even one that
    left the process group with setsid(), and no directory is left behind."""
    assert sandbox.isolation().complete, sandbox.isolation().summary
    token = f"taskprune-token-{uuid.uuid4().hex}"
    program = (SLEEPER if hook else ESCAPER).replace("{token}", token)
    dirs_before = _sandbox_dirs()
    harness = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f'''
        from taskprune.evaluate import sandbox
        sandbox._run_program({program!r}, 600.0, sandbox.Limits(max_processes=1),
                             audit_hook={hook}, require_isolation=True)
    ''')])
    try:
        def running() -> set[tuple[int, str]]:
            tree = _descendants(harness.pid)
            table = _processes()
            # the namespace's init and, forked from it, the runner
            runner = sum(b"sandbox_child.py\0setup" in table.get(pid, (0, "", "", b""))[3]
                         for pid, _ in tree) >= 2
            escaped = hook or any(token.encode() in row[3] for row in table.values())
            return tree if runner and escaped else set()

        tree = _wait_for(running, 30.0)
        assert tree, "the sandboxed program never started"
        time.sleep(0.3)  # let it beat a few times
        tree = _descendants(harness.pid) | tree
    finally:
        harness.kill()
        harness.wait()
    left = _wait_for(lambda: not _alive(tree, token.encode()), 10.0)
    assert left, _alive(tree, token.encode())
    assert _sandbox_dirs() <= dirs_before  # the program's directory lived in its namespace


def test_timeout_kills_escaped_processes(contained: Callable[..., SandboxResult]) -> None:
    token = f"taskprune-token-{uuid.uuid4().hex}"
    result = contained(ESCAPER.replace("{token}", token), timeout_s=1.0,
                       limits=Limits(max_processes=1))
    assert result.status in ("timeout", "failed") and not result.passed
    if contained.hook:  # type: ignore[attr-defined]
        assert "not allowed" in result.stderr  # os.setsid / os.execv refused
    assert _wait_for(lambda: not _alive(set(), token.encode()), 10.0), _alive(set(), token.encode())


def test_runner_is_not_pid_one_and_cpu_limit_is_a_timeout(
    contained: Callable[..., SandboxResult],
) -> None:
    """The runner is a child of the namespace's init, so RLIMIT_CPU's SIGXCPU is delivered
    (an init would ignore it) and reported as a timeout with the signal's number."""
    result = contained("import os\nprint('pid=%d' % os.getpid(), flush=True)\nwhile True:\n    pass\n",
                       timeout_s=20.0, limits=Limits(cpu_s=1))
    assert outcomes(result)["pid"] != "1", result
    assert result.status == "timeout" and result.returncode == -signal.SIGXCPU, result


NESTED = r'''
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def report(name, result):
    print(name + "=" + ("ok" if result == 0 else os.strerror(ctypes.get_errno())))
report("unshare", libc.unshare(0x10000000 | 0x00020000))  # CLONE_NEWUSER | CLONE_NEWNS
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE, MS_NOSUID = 32, 4096, 16384, 1 << 18, 2
libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None)
report("remount-root-rw", libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND | MS_NOSUID, None))
report("remount-target-rw", libc.mount(None, {target!r}, None, MS_REMOUNT | MS_BIND, None))
report("umount-tmp", libc.umount2(b"/tmp", 2))
report("umount-root-home", libc.umount2(b"/root", 2))
report("bind-root", libc.mount(b"/", {target!r}, None, MS_BIND, None))
try:
    open({sentinel!r}, "w").write("escaped")
    print("write=DONE")
except OSError as exc:
    print("write=" + os.strerror(exc.errno))
'''


def test_nested_namespaces_cannot_undo_the_view(visible_dir: Path) -> None:
    """Without the hook, ctypes: a nested user+mount namespace (all capabilities in it)
    still cannot make the view writable or uncover what it hides: the kernel locks the
    read-only flags and the covering mounts of a less privileged namespace."""
    assert sandbox.isolation().complete, sandbox.isolation().summary
    sentinel = visible_dir / "escaped.txt"
    program = NESTED.format(target=str(visible_dir).encode(), sentinel=str(sentinel))
    result = sandbox._run_program(program, 10.0, Limits(), audit_hook=False,
                                  require_isolation=True)
    seen = outcomes(result)
    assert result.passed, result
    assert not sentinel.exists()
    if seen["unshare"] == "ok":  # user namespaces may be disabled; then so is the attack
        for name in ("remount-root-rw", "remount-target-rw", "umount-tmp", "bind-root"):
            assert seen[name] != "ok", seen
        if Path("/root").is_dir():
            assert seen["umount-root-home"] != "ok", seen
    assert seen["write"] != "DONE", seen
