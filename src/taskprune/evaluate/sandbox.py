"""Run untrusted generated programs (HumanEval / MBPP completions plus their tests).

Each program runs in its own short-lived process tree and counts as passed only if it ran
to the end of its source without an uncaught exception.

Threat model
------------
*Trusted*: this module, :mod:`taskprune.evaluate.sandbox_child` (the child side: a
stdlib-only script run by path), the Python interpreter, the Linux kernel and util-linux's
``unshare``/``setpriv``. *Untrusted*: the program text, which may be written to attack the
harness (escape, read secrets, persist, forge a pass). The harness must keep the host
intact and its secrets unread, leave nothing behind, and report ``passed`` only for a
program that really ran to its end.

Layers, from the outside in. Kernel-enforced ones hold even if everything inside the
sandboxed process (the audit hook included) is defeated; :func:`isolation` probes which of
them work here, and :func:`run_program` refuses to run without the required ones unless
``require_isolation=False``.

* ``death-signal`` (kernel; required). The chain is ``setpriv --pdeathsig KILL unshare
  --fork --kill-child ... python -I -B sandbox_child.py setup``: each process gets
  ``SIGKILL`` when its parent dies; the setup stage re-arms it after the uid change (the
  kernel clears it on credential changes) and then checks that the harness is still its
  grandparent; the setup process becomes the PID namespace's init and forks the runner, so
  the init's death kills every process inside, including any that left the process group.
  Nothing outlives a harness killed with ``kill -9``; the program's files live in a tmpfs
  that exists only in the sandbox's mount namespace, so nothing is left on disk either.
  (The kernel ties the signal to the harness *thread* that started the child; that thread
  is blocked in :func:`run_program` until the child is gone.)
* ``pid-ns``, ``net-ns``, ``ipc-ns`` (kernel; the first two required): no process outside
  can be named or signalled, a fresh ``/proc`` shows only the sandbox; no network at all
  (only a down loopback; AF_UNIX sockets under the covered directories are gone too); no
  System V IPC / POSIX message queues shared with the host (they would outlive the run).
* ``read-only-fs`` (kernel; required): a private mount namespace in which every mount is
  bind-remounted read-only (and checked: a mount point still writable aborts the run);
  ``/tmp``, ``/var/tmp``, ``/run`` and the harness user's home are covered by empty
  read-only tmpfs (with the interpreter, the venv and the child script bound back
  read-only where they live below one, or below a directory the program's uid could not
  traverse); ``/dev`` is a minimal tmpfs holding only null, zero, full, random and
  urandom; the only writable place is the program's directory
  ``/tmp/taskprune-sandbox-*``, a fresh tmpfs.
* ``disk-quota`` (kernel): that tmpfs is ``Limits.disk_mb`` large (and inode-limited), so
  filling it ends in ``ENOSPC`` without touching the host's disks; ``RLIMIT_FSIZE`` bounds
  single files (``EFBIG``).
* ``unprivileged-uid`` when started as root, ``user-ns`` otherwise (kernel; one of them
  required). As root, the program runs as uid/gid 65534 with no supplementary groups and
  no capabilities (an empty bounding set), so root-only files (``/etc/shadow``, ``/root``,
  site-packages when writable only by root) are out of reach even through races. Without
  root it runs as root of a fresh user namespace with every capability dropped and
  ``SECBIT_NOROOT`` locked: it keeps the harness user's file permissions, minus what the
  covers hide.
* ``no-new-privs`` (kernel): set-uid binaries and file capabilities grant nothing.
* ``rlimits`` (kernel, set in-process before the program): ``RLIMIT_CPU``, ``RLIMIT_AS``,
  ``RLIMIT_FSIZE``, ``RLIMIT_CORE`` = 0 and, when ``max_processes`` is 0,
  ``RLIMIT_NPROC`` = 0 (enforced for the unprivileged uid: no fork, no thread).
* ``audit-hook`` (in-process; defence in depth only). :func:`sys.addaudithook` refuses:
  creating processes beyond ``max_processes``; signalling; sockets; ``ctypes``; changing
  rlimits; new audit hooks, tracing and ``gc``-based object discovery; writes, renames,
  deletions and metadata changes outside the program's directory (paths resolved through
  symlinks with functions bound before the program runs); any ``dir_fd`` other than the
  default; opening a directory with any flags that can yield a descriptor of it (a
  read-only access mode without ``O_CREAT``/``O_TRUNC``, ``O_APPEND`` or not), and every
  ``O_PATH``/``O_DIRECTORY``/``O_TMPFILE`` open (the ``open`` event carries no ``dir_fd``,
  so no directory descriptor may exist); ``/proc`` and devices beyond the harmless ones;
  extension modules
  from outside the import path; C modules that act without audit events. Functions with no
  audit event (``_posixsubprocess.fork_exec``, ``os.pidfd_open``, ``os.setsid``,
  ``_imp.create_builtin`` ...) are replaced by refusing stubs. A thread that swaps a path
  between the hook's check and the kernel's open defeats the hook; the kernel layers above
  are what contain that.
* **Wall-clock timeout** and **bounded output**, enforced by the harness: the process
  group is killed with ``SIGKILL`` at the deadline and after every exit; stdout and stderr
  are drained concurrently and capped at ``Limits.output_bytes`` each.

Completion is proven with a random per-run nonce, sent with the program on the child's
stdin (the program text never touches the host's disk). The runner keeps it only inside a
suspended generator (the "vault") that writes it to an inherited pipe when, and only when,
resumed directly by the runner's own frame after ``exec(program)`` returned normally.
``passed`` requires that nonce on the pipe *and* exit status 0, so ``sys.exit(0)``,
``os._exit(0)``, ``atexit`` tricks, replaced builtins or early exits yield
``passed=False``.

What remains: world-readable files are readable (the repository, ``/usr``, ``/etc``
except secrets), as are the harness user's own files when running unprivileged via a user
namespace (outside its covered home); filesystem AF_UNIX sockets outside the covered
directories stay connectable if their permissions allow; kernel bugs, and the kernel
surface the program can reach (no seccomp filter; where the kernel allows unprivileged
user namespaces it can create nested ones, though the view's read-only flags and covers
are locked against them); CPU and memory contention with the host (no cgroups; tmpfs
pages count towards memory); and the nonce is in-process, so a program that
defeats the interpreter (raw memory access through crafted bytecode) could forge a pass,
though not escape. Without the kernel layers (``require_isolation=False`` on a machine
lacking them) only the in-process layers and whatever :func:`isolation` reports apply:
then a race can write outside, root-only files are readable to a root harness, and a
killed harness can leave processes and a temporary directory behind.

On the development machine (Linux 6.18, root, util-linux 2.38, 2 cores) every layer above
is in effect (``isolation().summary``), and the same holds there for a non-root harness
(``user-ns`` instead of ``unprivileged-uid``). Cost (``benchmarks/sandbox_throughput.py``,
164 HumanEval reference solutions, 2 workers, 3 alternating rounds, quiet machine): 32.0
programs/s and 56 ms of child CPU per program against 41.3 programs/s and 41 ms for the
previous hook-plus-``unshare --net --pid`` sandbox, 0.78x its throughput: about 5 s for all
164 problems, against tens of minutes to generate them.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = [
    "Isolation",
    "Limits",
    "REQUIRED_LAYERS",
    "SandboxResult",
    "SandboxUnavailable",
    "check_isolation",
    "isolation",
    "run_many",
    "run_program",
]

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
_NOBODY = 65534
_NONCE_LEN = 32
_SIGXCPU = getattr(signal, "SIGXCPU", None)

#: Kernel layers without which :func:`run_program` refuses to run by default.
#: ``"unprivileged"`` is met by ``unprivileged-uid`` (root) or ``user-ns`` (not root).
REQUIRED_LAYERS = ("unprivileged", "read-only-fs", "pid-ns", "net-ns", "death-signal")
_KERNEL_LAYERS = ("read-only-fs", "pid-ns", "net-ns", "ipc-ns", "death-signal",
                  "disk-quota", "no-new-privs")
_IN_PROCESS_LAYERS = ("rlimits", "audit-hook")


@dataclass(frozen=True)
class Limits:
    """Resource limits applied to each sandboxed program.

    Attributes:
        cpu_s: CPU seconds (``RLIMIT_CPU`` soft limit; the hard limit is one second more).
        memory_mb: address-space limit in MiB (``RLIMIT_AS``).
        file_size_mb: largest file the program may write, in MiB (``RLIMIT_FSIZE``).
        max_processes: extra processes the program may start with ``os.fork`` (0 = none).
            ``exec``-family calls, ``subprocess`` and ``posix_spawn`` are refused at any
            value. At 0, ``RLIMIT_NPROC`` = 0 also stops threads where the program runs
            as an unprivileged uid; otherwise threads are only bounded by ``memory_mb``.
        output_bytes: bytes of stdout and of stderr kept (each); the rest is drained and
            discarded.
        disk_mb: size of the program's directory (a tmpfs, when the ``disk-quota`` layer
            is in effect): writes beyond it fail with ``ENOSPC``.
    """

    cpu_s: int = 5
    memory_mb: int = 1024
    file_size_mb: int = 16
    max_processes: int = 0
    output_bytes: int = 64_000
    disk_mb: int = 64


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed program.

    Attributes:
        passed: True only if the program ran to the end of its source (the runner's
            completion nonce arrived) and the process exited with status 0.
        status: ``"passed"``, ``"failed"`` (exception, early exit, refused operation,
            crash), ``"timeout"`` (wall-clock timeout or CPU limit) or ``"error"`` (the
            harness could not run the program; nothing is known about it).
        returncode: exit status of the child process (negative: killed by that signal),
            or None if no process was started.
        stdout: captured standard output, at most ``Limits.output_bytes`` bytes, decoded
            as UTF-8 with replacement.
        stderr: captured standard error, same cap.
        wall_s: wall-clock seconds from sandbox setup to reaping the process.
    """

    passed: bool
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float


@dataclass(frozen=True)
class Isolation:
    """Which containment layers the sandbox gets on this machine (see the module doc).

    Attributes:
        layers: layers in effect, kernel ones first (``"unprivileged-uid"`` or
            ``"user-ns"``, ``"read-only-fs"``, ``"pid-ns"``, ``"net-ns"``, ``"ipc-ns"``,
            ``"death-signal"``, ``"disk-quota"``, ``"no-new-privs"``), then the in-process
            ``"rlimits"`` and ``"audit-hook"``.
        missing: kernel layers expected here but not in effect (required or not).
        detail: why layers are missing (probe errors), empty when none are.
    """

    layers: tuple[str, ...]
    missing: tuple[str, ...]
    detail: str = ""

    @property
    def required_missing(self) -> tuple[str, ...]:
        """The members of :attr:`missing` that :data:`REQUIRED_LAYERS` asks for."""
        required = {"read-only-fs", "pid-ns", "net-ns", "death-signal",
                    "unprivileged-uid", "user-ns"}
        return tuple(layer for layer in self.missing if layer in required)

    @property
    def complete(self) -> bool:
        """True when every required kernel layer is in effect."""
        return not self.required_missing

    @property
    def summary(self) -> str:
        """One line for logs and ``summary.json``."""
        text = "sandbox layers: " + (", ".join(self.layers) or "none")
        if self.missing:
            text += "; MISSING: " + ", ".join(self.missing)
            if self.detail:
                text += " (" + self.detail + ")"
        return text


class SandboxUnavailable(RuntimeError):
    """A required kernel isolation layer is not available on this machine."""


@dataclass(frozen=True)
class _Plan:
    """How to start the child: the command before the interpreter, and what it gives."""

    kind: str  # "namespaces" (setup stage, full view) or "plain" (runner directly)
    prefix: tuple[str, ...]
    userns: bool = False
    runner_is_child: bool = True  # the runner's parent is the harness (no PID namespace)
    broken: bool = False  # not even the plain runner could be started


_HOOK_ONLY = _Plan("plain", ())


# --------------------------------------------------------------------------------------
# Probing the machine
# --------------------------------------------------------------------------------------


def _under(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top.rstrip("/") + "/")


def _home() -> str | None:
    home = os.path.realpath(os.path.expanduser("~"))
    return home if home != "/" and os.path.isdir(home) else None


def _view_paths(root_mode: bool) -> tuple[list[str], list[str]]:
    """(covers, restores) for the setup stage's file-system view.

    Covers are directories hidden under an empty read-only tmpfs: the world-writable or
    socket-holding ``/tmp``, ``/var/tmp``, ``/run``, the harness user's home and, as root,
    the topmost directory on the way to the interpreter that uid 65534 could not traverse.
    Restores are the trees the child needs (interpreter, venv, the child script) that lie
    below a cover; they are bound back read-only.
    """
    needed = {os.path.realpath(path) for path in (
        sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
        os.path.dirname(_CHILD))}
    path = os.path.abspath(sys.executable)
    for _ in range(40):  # every directory on the interpreter's symlink chain
        needed.add(os.path.realpath(os.path.dirname(path)))
        if not os.path.islink(path):
            break
        path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
    needed = {p for p in needed if not any(q != p and _under(p, q) for q in needed)}
    covers = {os.path.realpath(p) for p in ("/tmp", "/var/tmp", "/run")}
    home = _home()
    if home is not None:
        covers.add(home)
    if root_mode:
        for target in needed:
            parts = target.strip("/").split("/")
            for depth in range(1, len(parts) + 1):
                ancestor = "/" + "/".join(parts[:depth])
                try:
                    mode = os.stat(ancestor).st_mode
                except OSError:
                    break
                if not mode & 0o001:
                    covers.add(ancestor)
                    break
    covers = {c for c in covers if c != "/" and os.path.isdir(c) and not os.path.islink(c)}
    covers = {c for c in covers if not any(o != c and _under(c, o) for o in covers)}
    restores = sorted(p for p in needed if any(_under(p, c) for c in covers))
    return sorted(covers), restores


def _probe_dirs() -> list[str]:
    """Places the probe tries to write to; under the full view all must refuse."""
    dirs = ["/", "/tmp", "/var/tmp", "/dev/shm", "/run", "/etc", "/usr", sys.prefix,
            sysconfig.get_paths().get("purelib", sys.prefix), os.path.dirname(_CHILD),
            tempfile.gettempdir(), os.getcwd()]
    home = _home()
    if home is not None:
        dirs.append(home)
    return sorted({os.path.realpath(d) for d in dirs})


def _host_namespaces() -> dict[str, int | None]:
    found: dict[str, int | None] = {}
    for name in ("mnt", "pid", "net", "ipc", "user"):
        try:
            found[name] = os.stat(f"/proc/self/ns/{name}").st_ino
        except OSError:
            found[name] = None
    return found


def _candidates() -> list[_Plan]:
    if not sys.platform.startswith("linux"):
        return [_HOOK_ONLY]
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    userns = os.geteuid() != 0
    plans = []
    death = (setpriv, "--pdeathsig", "KILL", "--") if setpriv else ()
    if unshare:
        user = ("--user", "--map-root-user") if userns else ()
        if setpriv:
            plans.append(_Plan("namespaces", (*death, unshare, *user, "--mount", "--pid",
                                              "--net", "--ipc", "--fork", "--kill-child",
                                              "--"), userns, runner_is_child=False))
        plans.append(_Plan("plain", (*death, unshare, *user, "--net", "--pid", "--ipc",
                                     "--fork", "--kill-child", "--"), userns,
                           runner_is_child=False))
    if setpriv:
        plans.append(_Plan("plain", death))
    plans.append(_HOOK_ONLY)
    return plans


def _layers_from(plan: _Plan, facts: dict, host: dict) -> tuple[list[str], str]:
    """Kernel layers proven by what the probe saw from the inside; and notes on gaps."""
    ns = facts.get("ns") or {}
    setup = facts.get("setup") or {}
    layers, notes = [], []

    def moved(name: str) -> bool:
        return ns.get(name) is not None and ns.get(name) != host.get(name)

    if facts.get("cap_eff") == 0:
        if not plan.userns and facts.get("euid") == _NOBODY and facts.get("uid") == _NOBODY \
                and facts.get("gid") == _NOBODY and not facts.get("groups"):
            layers.append("unprivileged-uid")
        elif plan.userns and moved("user"):
            layers.append("user-ns")
    if plan.kind == "namespaces" and moved("mnt") and setup.get("read_only_mounts"):
        if facts.get("writable"):
            notes.append("writable outside the sandbox: " + ", ".join(facts["writable"]))
        elif facts.get("cwd_writable"):
            layers.append("read-only-fs")
    if moved("pid"):
        layers.append("pid-ns")
    if moved("net") and set(facts.get("interfaces") or ["?"]) <= {"lo"}:
        layers.append("net-ns")
    if moved("ipc"):
        layers.append("ipc-ns")
    if plan.prefix[:1] and plan.prefix[0].endswith("setpriv") and (
            (plan.kind == "namespaces" and setup.get("pdeathsig") == "SIGKILL")
            or (plan.kind == "plain" and "--kill-child" in plan.prefix)):
        layers.append("death-signal")
    quota = setup.get("quota_mb")
    size = facts.get("cwd_bytes")
    if quota and size and size <= quota * 1024 * 1024:
        layers.append("disk-quota")
    if facts.get("no_new_privs"):
        layers.append("no-new-privs")
    return layers, "; ".join(notes)


def _describe(plan: _Plan) -> str:
    tools = [os.path.basename(part) for part in plan.prefix if part.startswith("/")]
    return "+".join([*tools, "setup" if plan.kind == "namespaces" else "runner"])


def _expected_layers() -> tuple[str, ...]:
    unprivileged = "user-ns" if os.geteuid() != 0 else "unprivileged-uid"
    return (unprivileged, *_KERNEL_LAYERS)


@functools.lru_cache(maxsize=16)
def _probe(key: tuple) -> tuple[_Plan, Isolation]:
    """Try the candidate configurations, strongest first; keyed on what they depend on."""
    del key  # only the cache uses it
    host = _host_namespaces()
    expected = _expected_layers()
    problems = []
    for plan in _candidates():
        # Write probes only where the file system should be read-only: never on the host.
        dirs = _probe_dirs() if plan.kind == "namespaces" else []
        result = _execute(plan, b"", 10.0, Limits(), probe_dirs=dirs)
        if result.status != "passed":
            message = (result.stderr.strip().splitlines() or [result.status])[-1]
            problems.append(f"{_describe(plan)}: {message}")
            continue
        try:
            facts = json.loads(result.stdout)
        except ValueError:
            problems.append(f"{_describe(plan)}: unreadable probe output")
            continue
        layers, notes = _layers_from(plan, facts, host)
        if notes:
            problems.append(notes)
        ordered = [layer for layer in expected if layer in layers]
        missing = tuple(layer for layer in expected if layer not in layers)
        detail = "; ".join(problems) if missing else ""
        return plan, Isolation((*ordered, *_IN_PROCESS_LAYERS), missing, detail)
    return (_Plan("plain", (), broken=True),
            Isolation(_IN_PROCESS_LAYERS, expected, "; ".join(problems)))


def _probe_key() -> tuple:
    return (sys.platform, sys.executable, sys.prefix, sys.base_prefix, os.geteuid(),
            os.getegid(), shutil.which("unshare"), shutil.which("setpriv"), _home(), _CHILD)


def isolation() -> Isolation:
    """Probe (once per interpreter, user and tool set; cached) which layers are in effect.

    The probe runs the real child once under each candidate configuration, strongest
    first, and reports what the child observed from the inside (uid, capabilities,
    namespaces, which host directories it could write to, its disk quota).
    """
    return _probe(_probe_key())[1]


def check_isolation(require_isolation: bool = True) -> Isolation:
    """The layers in effect here; raises :class:`SandboxUnavailable` (naming what is missing and
    the fix) when ``require_isolation`` and a required kernel layer is missing. A harness calls it
    before generating anything, so a missing layer stops a run at its start."""
    _plan_for(require_isolation)
    return isolation()


def _plan_for(require_isolation: bool) -> _Plan:
    plan, found = _probe(_probe_key())
    if require_isolation and found.required_missing and not plan.broken:
        raise SandboxUnavailable(
            "taskprune sandbox: required isolation layers are missing: "
            + ", ".join(found.required_missing)
            + (f" ({found.detail})" if found.detail else "")
            + ". They need Linux with util-linux's unshare and setpriv, run as root or with"
            " unprivileged user namespaces enabled (user.max_user_namespaces > 0; in a"
            " container, a seccomp/AppArmor profile that allows unshare and mount). To run"
            " anyway with only " + ", ".join(found.layers)
            + ", pass require_isolation=False (CLI: --no-require-isolation)."
        )
    return plan


# --------------------------------------------------------------------------------------
# Running one child
# --------------------------------------------------------------------------------------


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's process group and the child itself (it has not been reaped yet)."""
    for kill, target in ((os.killpg, proc.pid), (os.kill, proc.pid)):
        try:
            kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _has_exited(pid: int) -> bool:
    """Whether ``pid`` has exited, without reaping it (so its pid/pgid cannot be reused)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _supervise(
    proc: subprocess.Popen[bytes], marker_fd: int, stdin_data: bytes, timeout_s: float,
    output_bytes: int,
) -> tuple[bytes, bytes, bytes, bool]:
    """Feed stdin; drain stdout, stderr and the marker pipe until the child is gone or time
    is up.

    Returns (stdout, stderr, marker, timed_out). The process group is killed when the
    deadline passes and, to reap stragglers, as soon as the child itself has exited.
    """
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    in_fd, out_fd, err_fd = proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()
    buffers = {out_fd: bytearray(), err_fd: bytearray(), marker_fd: bytearray()}
    caps = {out_fd: output_bytes, err_fd: output_bytes, marker_fd: 4096}
    open_streams = set(buffers)
    pending = memoryview(stdin_data)
    deadline = time.monotonic() + timeout_s
    timed_out = False
    grace_until: float | None = None  # set once the child is dead: drain what is left
    try:  # readable when the child exits, so the loop need not poll (Linux >= 5.3)
        exit_fd: int | None = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        exit_fd = None
    try:
        with selectors.DefaultSelector() as selector:
            for fd in buffers:
                os.set_blocking(fd, False)
                selector.register(fd, selectors.EVENT_READ)
            os.set_blocking(in_fd, False)
            selector.register(in_fd, selectors.EVENT_WRITE)
            if exit_fd is not None:
                selector.register(exit_fd, selectors.EVENT_READ)
            while True:
                now = time.monotonic()
                if grace_until is None:
                    if _has_exited(proc.pid):
                        _kill_group(proc)
                        grace_until = now + 1.0
                    elif now >= deadline:
                        timed_out = True
                        _kill_group(proc)
                        grace_until = now + 1.0
                if grace_until is not None and (now >= grace_until or not open_streams):
                    break
                wait = (grace_until if grace_until is not None else deadline) - now
                if exit_fd is None:
                    wait = min(wait, 0.01)
                for key, _ in selector.select(timeout=max(0.0, wait)):
                    if key.fd == exit_fd:
                        selector.unregister(exit_fd)  # stays readable; seen once is enough
                        continue
                    if key.fd == in_fd:
                        try:
                            pending = pending[os.write(in_fd, pending[:65536]):]
                        except BlockingIOError:
                            continue
                        except OSError:  # the child is gone; reported by what follows
                            pending = pending[:0]
                        if not pending:
                            selector.unregister(in_fd)
                            proc.stdin.close()
                        continue
                    try:
                        data = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        selector.unregister(key.fd)
                        open_streams.discard(key.fd)
                        continue
                    buffer = buffers[key.fd]
                    room = caps[key.fd] - len(buffer)
                    if room > 0:
                        buffer += data[:room]
    finally:
        if exit_fd is not None:
            os.close(exit_fd)
    return bytes(buffers[out_fd]), bytes(buffers[err_fd]), bytes(buffers[marker_fd]), timed_out


def _error(message: str, started: float) -> SandboxResult:
    return SandboxResult(False, "error", None, "", message, time.monotonic() - started)


def _execute(
    plan: _Plan,
    source: bytes,
    timeout_s: float,
    limits: Limits,
    *,
    audit_hook: bool = True,
    probe_dirs: list[str] | None = None,
) -> SandboxResult:
    """Run one child under ``plan``; with ``probe_dirs``, the runner reports facts instead."""
    started = time.monotonic()
    nonce = secrets.token_hex(_NONCE_LEN // 2).encode("ascii")
    run_cfg = {
        "cpu_s": limits.cpu_s,
        "memory_mb": limits.memory_mb,
        "file_size_mb": limits.file_size_mb,
        "max_processes": limits.max_processes,
        "nonce_len": _NONCE_LEN,
        "audit_hook": audit_hook,
        "probe": probe_dirs is not None,
        "probe_dirs": probe_dirs or [],
        "harness_pid": os.getpid() if plan.runner_is_child else None,
    }
    temp: tempfile.TemporaryDirectory[str] | None = None
    marker_r, marker_w = os.pipe()
    try:
        run_cfg["marker_fd"] = marker_w
        if plan.kind == "namespaces":
            root = "/tmp/taskprune-sandbox-" + secrets.token_hex(8)  # inside the namespace
            covers, restores = _view_paths(root_mode=not plan.userns)
            setup_cfg = {
                "harness_pid": os.getpid(),
                "mode": "userns" if plan.userns else "root",
                "uid": 0 if plan.userns else _NOBODY,
                "gid": 0 if plan.userns else _NOBODY,
                "root": root,
                "disk_mb": limits.disk_mb,
                "inodes": max(1024, limits.disk_mb * 256),
                "cover": covers,
                "restore": restores,
                "run": run_cfg,
            }
            command = [*plan.prefix, sys.executable, "-I", "-B", _CHILD, "setup",
                       json.dumps(setup_cfg)]
            cwd = "/"
        else:
            temp = tempfile.TemporaryDirectory(prefix="taskprune-sandbox-",
                                               ignore_cleanup_errors=True)
            root = temp.name
            os.mkdir(os.path.join(root, "home"))
            os.mkdir(os.path.join(root, "tmp"))
            command = [*plan.prefix, sys.executable, "-I", "-B", _CHILD, "run",
                       json.dumps(run_cfg)]
            cwd = root
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": os.path.join(root, "home"),
            "TMPDIR": os.path.join(root, "tmp"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
        }
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=env,
                pass_fds=(marker_w,),
                close_fds=True,
                start_new_session=True,
            )
        except OSError as exc:
            return _error(f"taskprune sandbox: could not start the runner: {exc!r}", started)
        finally:
            os.close(marker_w)
            marker_w = -1
        try:
            stdout, stderr, marker, timed_out = _supervise(
                proc, marker_r, nonce + source, timeout_s, limits.output_bytes
            )
        finally:
            _kill_group(proc)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None and not stream.closed:
                    stream.close()
    except OSError as exc:
        return _error(f"taskprune sandbox: could not prepare the sandbox: {exc!r}", started)
    finally:
        os.close(marker_r)
        if marker_w >= 0:
            os.close(marker_w)
        if temp is not None:
            temp.cleanup()
    wall_s = time.monotonic() - started
    returncode = proc.returncode
    if plan.kind == "namespaces" and returncode is not None and 128 < returncode < 128 + 65:
        returncode = 128 - returncode  # the namespace's init reports "killed by N" as 128+N
    ready = marker.startswith(b"R")
    passed = not timed_out and returncode == 0 and marker == b"R" + nonce
    if probe_dirs is not None:
        passed = not timed_out and returncode == 0 and marker == b"R"
    if passed:
        status = "passed"
    elif timed_out or (_SIGXCPU is not None and returncode == -_SIGXCPU):
        status = "timeout"
    elif not ready:
        status = "error"
    else:
        status = "failed"
    return SandboxResult(
        passed=passed,
        status=status,
        returncode=returncode,
        stdout=stdout.decode("utf-8", "replace"),
        stderr=stderr.decode("utf-8", "replace"),
        wall_s=wall_s,
    )


def _check(timeout_s: float, limits: Limits) -> None:
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if limits.cpu_s < 1 or limits.memory_mb < 1 or limits.file_size_mb < 0:
        raise ValueError(f"invalid limits: {limits}")
    if limits.max_processes < 0 or limits.output_bytes < 0 or limits.disk_mb < 1:
        raise ValueError(f"invalid limits: {limits}")


def _run_program(
    program: str,
    timeout_s: float,
    limits: Limits,
    use_namespaces: bool = True,
    *,
    audit_hook: bool = True,
    require_isolation: bool = False,
) -> SandboxResult:
    """:func:`run_program` with its layers selectable (tests run the hook alone, and the
    kernel layers without the hook)."""
    _check(timeout_s, limits)
    plan = _plan_for(require_isolation) if use_namespaces else _HOOK_ONLY
    started = time.monotonic()
    try:
        source = program.encode("utf-8")
    except UnicodeError as exc:
        return _error(f"taskprune sandbox: could not prepare the sandbox: {exc!r}", started)
    return _execute(plan, source, timeout_s, limits, audit_hook=audit_hook)


def run_program(
    program: str,
    timeout_s: float = 3.0,
    limits: Limits = Limits(),
    *,
    require_isolation: bool = True,
) -> SandboxResult:
    """Run one untrusted program in a fresh sandbox and report whether it passed.

    Args:
        program: complete source text, e.g. ``prompt + completion + "\\n" + test +
            "\\ncheck(entry_point)\\n"`` for HumanEval, or MBPP code followed by its asserts.
        timeout_s: wall-clock limit in seconds; the whole process tree is killed after it.
        limits: resource limits for the child.
        require_isolation: raise :class:`SandboxUnavailable` if a required kernel layer
            (:data:`REQUIRED_LAYERS`) is missing on this machine; when False, run with the
            layers there are (see :func:`isolation`; the caller should log its summary).

    Returns:
        A :class:`SandboxResult`. Harness problems are reported as ``status="error"``
        rather than raised; invalid arguments raise :class:`ValueError`.
    """
    return _run_program(program, timeout_s, limits, require_isolation=require_isolation)


def run_many(
    programs: list[str],
    timeout_s: float = 3.0,
    limits: Limits = Limits(),
    workers: int = 2,
    *,
    require_isolation: bool = True,
) -> list[SandboxResult]:
    """Run :func:`run_program` over ``programs`` with ``workers`` threads; results keep input
    order. :class:`SandboxUnavailable` is raised before anything runs."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    _check(timeout_s, limits)
    if not programs:
        return []
    _plan_for(require_isolation)
    with ThreadPoolExecutor(max_workers=min(workers, len(programs))) as pool:
        return list(pool.map(
            lambda program: run_program(program, timeout_s, limits,
                                        require_isolation=require_isolation),
            programs,
        ))
