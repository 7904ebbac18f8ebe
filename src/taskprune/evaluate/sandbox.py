"""Run untrusted generated programs (HumanEval / MBPP completions plus their tests).

Each program runs in its own short-lived Python process and counts as passed only if it
ran to the end of its source without an uncaught exception.

Containment, from the outside in:

* **Process.** ``sys.executable -I -B`` runs a small runner (:data:`_RUNNER_SOURCE`) in a new
  session (its own process group), with a fresh :class:`tempfile.TemporaryDirectory` as
  working directory, ``HOME`` and ``TMPDIR`` (removed afterwards), a minimal environment
  (no inherited variables, so no inherited secrets) and no inherited file descriptors apart
  from stdin/stdout/stderr and the completion pipe.
* **Namespaces, when the kernel allows them.** On Linux the child is started under
  ``unshare --net --pid --fork --kill-child`` (with ``--user --map-root-user`` when not
  root) if a probe shows that works: a network namespace with only a down loopback, and a
  PID namespace in which no process outside the sandbox can be named, let alone
  signalled. Nothing depends on this layer; without it the checks below still apply.
* **Resource limits**, set by the runner before the program starts: ``RLIMIT_CPU``,
  ``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_CORE`` = 0 and, when ``max_processes`` is 0,
  ``RLIMIT_NPROC`` = 0. The kernel does not enforce ``RLIMIT_NPROC`` for root, hence:
* **An audit hook** (:func:`sys.addaudithook`, which cannot be removed), installed before
  the program runs, that refuses: creating processes (``os.fork`` beyond ``max_processes``,
  ``os.exec*``, ``os.posix_spawn``, ``os.system``, ``subprocess.Popen``); signalling
  (``os.kill``, ``os.killpg``, ``signal.pthread_kill``); every ``socket.*`` event;
  ``ctypes``; changing resource limits; adding audit hooks; tracing/profiling and
  ``gc``-based object discovery; writing, creating, renaming, deleting or changing
  metadata of anything outside the sandbox directory (paths resolved through symlinks with
  functions bound before the program runs); read-only opens of directories (so ``dir_fd=``
  tricks have nothing to work with); ``/proc`` and devices other than the harmless ones;
  loading extension modules from outside the interpreter's original import path; and
  importing modules that do such things in C without an audit event (``_posixsubprocess``,
  ``_ctypes``, ``_sqlite3``, ``_multiprocessing``, ``_posixshmem``, dbm, readline, the
  sub-interpreter and ``_test*`` modules).
* **Stubs for unaudited escapes.** ``_posixsubprocess.fork_exec``, ``os.pidfd_open``,
  ``signal.pidfd_send_signal``, ``os.mkfifo``/``mknod``/``setsid``/``setpgid``/``chroot``
  and a few more raise no audit event, so they are replaced by functions that refuse, after
  all builtin modules are imported and ``_imp.create_builtin`` is itself replaced (it could
  otherwise build fresh, unpatched copies of ``posix`` or ``_signal``).
* **Wall-clock timeout**: when it expires, and also after every normal exit (to reap
  stragglers), the whole process group gets ``SIGKILL``.
* **Bounded output**: stdout, stderr and the completion pipe are drained concurrently with
  :mod:`selectors`; at most ``Limits.output_bytes`` of each output stream is kept and the
  rest is read and discarded, so a flood can neither fill memory nor block the child.

Completion is proven with a random per-run nonce. The parent sends it on the child's
stdin; the runner reads it before the program starts, points stdin at ``/dev/null`` and
keeps it only inside a suspended generator (the "vault") that writes it to an inherited
pipe when, and only when, it is resumed directly by the runner's own frame after
``exec(program)`` returned normally. ``passed`` requires that exact nonce on the pipe *and*
exit status 0, so ``sys.exit(0)``, ``raise SystemExit``, ``os._exit(0)``, ``atexit``
handlers, replaced builtins (``print``, ``exit``, ``__import__``, ``AssertionError`` ...)
or an early ``return``-like escape all yield ``passed=False``. Before resuming the vault
the runner restores signal handlers, ``sys.stderr``/``sys.unraisablehook`` and disables
automatic garbage collection, so no program code can run while the vault's frame is live.

Limits of in-process checks (stated plainly): a program written specifically to attack
this runner through interpreter internals (hand-crafted bytecode or ``marshal`` data that
reads raw memory, a thread racing to swap a checked path for a symlink between the hook's
check and the open) is beyond what an audit hook can stop; so is reading world-readable
files outside the sandbox, which is allowed. Stronger guarantees need kernel mechanisms
(seccomp, a read-only mount namespace, an unprivileged uid); of those only the optional
namespaces above are used here.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["Limits", "SandboxResult", "run_program", "run_many"]


@dataclass(frozen=True)
class Limits:
    """Resource limits applied to each sandboxed program.

    Attributes:
        cpu_s: CPU seconds (``RLIMIT_CPU`` soft limit; the hard limit is one second more).
        memory_mb: address-space limit in MiB (``RLIMIT_AS``).
        file_size_mb: largest file the program may write, in MiB (``RLIMIT_FSIZE``).
        max_processes: extra processes the program may start with ``os.fork`` (0 = none).
            ``exec``-family calls, ``subprocess`` and ``posix_spawn`` are refused at any
            value. Threads count too where the interpreter audits thread creation
            (Python >= 3.12); on 3.10/3.11 threads are only bounded by ``memory_mb``.
        output_bytes: bytes of stdout and of stderr kept (each); the rest is drained and
            discarded.
    """

    cpu_s: int = 5
    memory_mb: int = 1024
    file_size_mb: int = 16
    max_processes: int = 0
    output_bytes: int = 64_000


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


# --------------------------------------------------------------------------------------
# The runner. It is executed with ``python -I -B -c`` and one argument (a JSON object with
# the non-secret settings); the nonce arrives on stdin. Everything the runner relies on
# after user code has started is bound to function locals or closures first, because the
# program can rebind module attributes and builtins but not another frame's locals.
# --------------------------------------------------------------------------------------
_RUNNER_SOURCE = r'''
import gc, json, os, signal, stat, sys

try:
    import resource
except ImportError:  # not on this platform
    resource = None


def _refuse(what):
    def refused(*args, **kwargs):
        raise PermissionError("taskprune sandbox: %s is not allowed" % what)
    return refused


def _read_secret():
    chunks = []
    while True:
        chunk = os.read(0, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return b"".join(chunks)


def _set_limits(cfg):
    if resource is None:
        return
    infinity = resource.RLIM_INFINITY

    def cap(which, soft, hard):
        current_hard = resource.getrlimit(which)[1]
        if current_hard != infinity:
            hard = min(hard, current_hard)
            soft = min(soft, hard)
        resource.setrlimit(which, (soft, hard))

    cap(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)
    memory = cfg["memory_mb"] * 1024 * 1024
    cap(resource.RLIMIT_AS, memory, memory)
    file_size = cfg["file_size_mb"] * 1024 * 1024
    cap(resource.RLIMIT_FSIZE, file_size, file_size)
    cap(resource.RLIMIT_CORE, 0, 0)
    if cfg["max_processes"] == 0 and hasattr(resource, "RLIMIT_NPROC"):
        # Per-user, not per-sandbox, and ignored for root: the audit hook is what counts.
        cap(resource.RLIMIT_NPROC, 0, 0)


_UNAUDITED = {  # module -> functions that act beyond the sandbox without an audit event
    "os": ("pidfd_open", "mkfifo", "mknod", "setsid", "setpgid", "setpgrp", "chroot",
           "unshare", "setns", "setpriority", "sched_setscheduler", "sched_setparam",
           "sched_setaffinity"),
    "posix": ("pidfd_open", "mkfifo", "mknod", "setsid", "setpgid", "setpgrp", "chroot",
              "unshare", "setns", "setpriority", "sched_setscheduler", "sched_setparam",
              "sched_setaffinity"),
    "signal": ("pidfd_send_signal",),
    "_signal": ("pidfd_send_signal",),
    "time": ("clock_settime", "clock_settime_ns"),
    "_posixsubprocess": ("fork_exec",),
    "_imp": ("create_builtin",),
}


def _disable_unaudited():
    """Replace functions that escape without raising an audit event by refusing stubs.

    Builtin modules are imported first, because afterwards ``_imp.create_builtin`` (which
    could otherwise build a fresh, unpatched copy of ``posix`` or ``_signal``) refuses.
    The originals become unreachable: module attributes were their only references.
    """
    try:
        import _posixsubprocess  # noqa: F401  (patched below; fresh loads are refused)
    except ImportError:
        pass
    for name in sys.builtin_module_names:
        if name not in sys.modules and name not in _DENIED_MODULES:
            try:
                __import__(name)
            except ImportError:
                pass
    for module_name, names in _UNAUDITED.items():
        module = sys.modules.get(module_name)
        for name in names:
            if module is not None and hasattr(module, name):
                setattr(module, name, _refuse("%s.%s" % (module_name, name)))


def _vault(fd, secret, main_frame, getframe, getpid, write):
    """Hold the nonce; write it only when resumed directly by the runner's main frame."""
    pid = getpid()
    try:
        yield
        if getframe(1) is main_frame and getpid() == pid:
            write(fd, secret)
    finally:  # also on throw()/close(): leave nothing behind in this frame
        fd = secret = main_frame = getframe = getpid = write = pid = None
    yield


_DENIED_MODULES = frozenset({
    "_posixsubprocess", "_ctypes", "_ctypes_test", "_sqlite3", "_multiprocessing",
    "_posixshmem", "_dbm", "_gdbm", "readline", "_xxsubinterpreters", "_xxinterpchannels",
    "_interpreters", "_interpchannels", "_interpqueues", "_testcapi", "_testinternalcapi",
    "_testbuffer", "_testclinic", "_testimportmultiple", "_testmultiphase",
    "_testsinglephase", "_testexternalinspection", "_xxtestfuzz",
})
_DENIED_EVENTS = frozenset({
    # processes (os.fork/os.forkpty are counted separately)
    "os.exec", "os.spawn", "os.posix_spawn", "os.system", "os.startfile", "subprocess.Popen",
    "pty.spawn", "webbrowser.open",
    # signalling other processes
    "os.kill", "os.killpg", "signal.pthread_kill",
    # limits, hooks, introspection that could reach the runner's state
    "resource.setrlimit", "resource.prlimit", "sys.addaudithook", "sys.settrace",
    "sys.setprofile", "sys._current_frames", "sys._current_exceptions", "gc.get_objects",
    "gc.get_referrers", "gc.get_referents", "sys.monitoring.register_callback",
    "cpython.PyInterpreterState_New", "sys.remote_exec",
})
_DENIED_PREFIXES = ("socket.", "ctypes.", "sqlite3.", "syslog.")
# event -> (indices of path arguments that must lie in the sandbox, indices of dir_fd args)
_PATH_EVENTS = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
    "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)),
    "os.truncate": ((0,), ()), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
    "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()), "os.mkfifo": ((0,), (2,)),
    "os.mknod": ((0,), (3,)), "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)),
    "os.symlink": ((1,), (2,)), "shutil.rmtree": ((0,), (1,)),
}
_SAFE_DEVICES = frozenset({"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"})


def _make_hook(root, vault, max_processes, import_dirs):
    # Bind everything now: the program may rebind builtins and module attributes later.
    lstat, stat_path, readlink, getcwd = os.lstat, os.stat, os.readlink, os.getcwd
    S_ISLNK, S_ISDIR = stat.S_ISLNK, stat.S_ISDIR
    str_, bytes_, int_, type_, issubclass_, len_ = str, bytes, int, type, issubclass, len
    str_copy, bytes_decode = str.__str__, bytes.decode
    fs_encoding, fs_errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    PermissionError_, AttributeError_ = PermissionError, AttributeError
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    o_path = getattr(os, "O_PATH", 0)
    default_dir_fds = (None, -1, getattr(os, "AT_FDCWD", -100))
    denied_modules, denied_events, denied_prefixes = _DENIED_MODULES, _DENIED_EVENTS, _DENIED_PREFIXES
    path_events, safe_devices = _PATH_EVENTS, _SAFE_DEVICES
    counted_events = frozenset({"os.fork", "os.forkpty", "_thread.start_new_thread",
                                "_thread.start_joinable_thread"})
    root_prefix = root + "/"
    forks_left = max_processes

    def refuse(what):
        raise PermissionError_("taskprune sandbox: %s is not allowed" % (what,))

    def as_text(value):
        kind = type_(value)
        if kind is str_:
            return value
        if issubclass_(kind, str_):
            return str_copy(value)
        if issubclass_(kind, bytes_):
            return bytes_decode(value, fs_encoding, fs_errors)
        return None

    def resolve(path):
        # realpath() re-implemented with the functions bound above (posixpath's helpers
        # are module attributes that the program could replace).
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        pending = path.split("/")
        pending.reverse()
        resolved = ""
        links = 0
        while pending:
            part = pending.pop()
            if part == "" or part == ".":
                continue
            if part == "..":
                resolved = resolved.rpartition("/")[0]
                continue
            candidate = resolved + "/" + part
            try:
                mode = lstat(candidate).st_mode
            except OSError:
                resolved = candidate
                continue
            if not S_ISLNK(mode):
                resolved = candidate
                continue
            links += 1
            if links > 40:
                refuse("a symlink loop")
            target = readlink(candidate)
            if target.startswith("/"):
                resolved = ""
            parts = target.split("/")
            parts.reverse()
            pending.extend(parts)
        return resolved or "/"

    def inside(path):
        return path == root or path.startswith(root_prefix)

    def under(path, top):
        return path == top or path.startswith(top + "/")

    def check_open(path, mode, flags):
        if issubclass_(type_(path), int_):
            return  # an already-open descriptor
        text = as_text(path)
        if text is None:
            refuse("opening a path of type %s" % (type_(path).__name__,))
        resolved = resolve(text)
        if under(resolved, "/proc"):
            refuse("opening %s" % (resolved,))
        if under(resolved, "/dev"):
            if resolved in safe_devices:
                return
            refuse("opening %s" % (resolved,))
        writing = False
        if type_(flags) is int_:
            writing = flags & write_flags and not flags & o_path
        if not writing and type_(mode) is str_:
            for char in "wax+":
                if char in mode:
                    writing = True
        if writing:
            if not inside(resolved):
                refuse("writing %s (outside the sandbox directory)" % (resolved,))
            return  # a write-mode open never yields a directory descriptor
        # Read-only (or O_PATH) descriptors of directories would make dir_fd= arguments
        # usable, and those are invisible to the path checks here.
        try:
            is_dir = S_ISDIR(stat_path(resolved).st_mode)
        except OSError:
            return
        if is_dir:
            refuse("opening a directory (%s)" % (resolved,))

    def check_paths(event, args):
        path_indices, dir_fd_indices = path_events[event]
        for index in dir_fd_indices:
            if index < len_(args) and args[index] not in default_dir_fds:
                refuse("%s with dir_fd" % (event,))
        for index in path_indices:
            value = args[index]
            if issubclass_(type_(value), int_):
                if event == "os.truncate":
                    continue  # ftruncate needs a descriptor that was opened for writing
                refuse("%s on a file descriptor" % (event,))
            text = as_text(value)
            if text is None:
                refuse("%s on a path of type %s" % (event, type_(value).__name__))
            resolved = resolve(text)
            if not inside(resolved):
                refuse("%s on %s (outside the sandbox directory)" % (event, resolved))

    def check_import(args):
        name = as_text(args[0])
        if name is None or name.rpartition(".")[2] in denied_modules:
            refuse("importing %s" % (name,))
        if len_(args) < 2 or args[1] is None:
            return
        filename = as_text(args[1])  # an extension module about to be dlopen()ed
        if filename is None:
            refuse("loading an extension module from a non-text path")
        resolved = resolve(filename)
        if resolved.rpartition("/")[2].partition(".")[0] in denied_modules:
            refuse("loading %s" % (resolved,))
        for directory in import_dirs:
            if resolved.startswith(directory + "/"):
                return
        refuse("loading the extension module %s" % (resolved,))

    def hook(event, args):
        nonlocal forks_left
        if event == "open":
            check_open(args[0], args[1], args[2])
        elif event == "import":
            check_import(args)
        elif event == "object.__getattr__":
            if args[0] is vault:  # gi_frame (its locals), gi_code, ...
                raise AttributeError_("taskprune sandbox: the runner's vault is private")
        elif event in path_events:
            check_paths(event, args)
        elif event in denied_events:
            refuse(event)
        elif event in counted_events:
            if forks_left <= 0:
                refuse(event + " (Limits.max_processes)")
            forks_left -= 1
        elif event.startswith(denied_prefixes):
            refuse(event)

    return hook


def _prepare(cfg, main_frame):
    """Everything before the program runs. Returns the vault; the nonce stays inside it."""
    secret = _read_secret()
    root = os.path.realpath(cfg["root"])
    import_dirs = []
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            directory = os.path.realpath(entry)
            if directory != root and not directory.startswith(root + "/"):
                import_dirs.append(directory)
    if hasattr(os, "unshare") and hasattr(os, "CLONE_NEWNET"):
        try:  # Python >= 3.12; best effort, and before os.unshare is stubbed out below
            os.unshare(os.CLONE_NEWNET)
        except OSError:
            pass
    _disable_unaudited()
    _set_limits(cfg)
    vault = _vault(cfg["marker_fd"], secret, main_frame, sys._getframe, os.getpid, os.write)
    next(vault)
    secret = None
    sys.addaudithook(_make_hook(root, vault, cfg["max_processes"], tuple(import_dirs)))
    return vault


def _main():
    main_frame = sys._getframe()
    exit_, write_, exec_, compile_, next_ = os._exit, os.write, exec, compile, next
    base_exception, system_exit, type_, issubclass_ = BaseException, SystemExit, type, issubclass
    sys_, out_, err_ = sys, sys.stdout, sys.stderr
    excepthook_, unraisablehook_ = sys.__excepthook__, sys.__unraisablehook__
    exc_info_, setrecursionlimit_ = sys.exc_info, sys.setrecursionlimit
    with_traceback_ = BaseException.with_traceback
    gc_disable_, signal_, setitimer_ = gc.disable, signal.signal, signal.setitimer
    timers_ = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)
    handlers_ = []
    for signum in signal.valid_signals():
        handler = signal.getsignal(signum)
        if handler is not None:
            handlers_.append((signum, handler))
    try:
        cfg = json.loads(sys.argv[1])
        marker_fd, program_path = cfg["marker_fd"], cfg["program"]
        with open(program_path, "rb") as handle:
            source = handle.read()
        module = type_(sys)("__main__")
        module.__file__ = program_path
        module.__builtins__ = __builtins__
        namespace = module.__dict__
        sys.modules["__main__"] = module
        sys.argv = [program_path]
        vault = _prepare(cfg, main_frame)
        write_(marker_fd, b"R")  # ready: the harness did its part
    except base_exception as exc:
        try:
            write_(2, ("taskprune sandbox: runner setup failed: %r\n" % (exc,)).encode())
        finally:
            exit_(3)

    status = 1
    try:
        try:
            exec_(compile_(source, program_path, "exec", dont_inherit=True), namespace)
        except base_exception:
            kind, value, traceback = exc_info_()
            setrecursionlimit_(1000)
            sys_.stdout, sys_.stderr = out_, err_
            traceback = traceback.tb_next  # start the report at the program, not here
            with_traceback_(value, traceback)
            excepthook_(kind, value, traceback)
            if issubclass_(kind, system_exit):
                err_.write("taskprune sandbox: the program exited before it finished; "
                           "that is not a pass\n")
        else:
            # The program finished. Make sure none of its code can run while the vault's
            # frame is live (signal handlers, GC finalizers, stderr/unraisable hooks).
            setrecursionlimit_(1000)
            gc_disable_()
            for timer in timers_:
                setitimer_(timer, 0)
            for signum, handler in handlers_:
                try:
                    signal_(signum, handler)
                except base_exception:
                    pass
            sys_.stdout, sys_.stderr, sys_.unraisablehook = out_, err_, unraisablehook_
            next_(vault, None)
            status = 0
    except base_exception:
        pass
    finally:
        try:
            out_.flush()
            err_.flush()
        except base_exception:
            pass
        exit_(status)


_main()
'''

_SIGXCPU = getattr(signal, "SIGXCPU", None)


def _isolation_prefix() -> list[str]:
    """Return an ``unshare`` command prefix for fresh network+PID namespaces, or ``[]``.

    Probed on every call (a few milliseconds) rather than cached, so nothing is kept in
    module state; any failure simply means the extra layer is not used.
    """
    if not sys.platform.startswith("linux"):
        return []
    unshare = shutil.which("unshare")
    probe = shutil.which("true")
    if unshare is None or probe is None:
        return []
    options = ["--net", "--pid", "--fork", "--kill-child"]
    candidates = [[unshare, *options]]
    if os.geteuid() != 0:
        candidates.append([unshare, "--user", "--map-root-user", *options])
    for prefix in candidates:
        try:
            probe_run = subprocess.run(
                [*prefix, probe],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if probe_run.returncode == 0:
            return prefix
    return []


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
    proc: subprocess.Popen[bytes], marker_fd: int, timeout_s: float, output_bytes: int
) -> tuple[bytes, bytes, bytes, bool]:
    """Drain stdout, stderr and the marker pipe until the child is gone or time is up.

    Returns (stdout, stderr, marker, timed_out). The process group is killed when the
    deadline passes and, to reap stragglers, as soon as the child itself has exited.
    """
    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    buffers = {out_fd: bytearray(), err_fd: bytearray(), marker_fd: bytearray()}
    caps = {out_fd: output_bytes, err_fd: output_bytes, marker_fd: 4096}
    open_streams = set(buffers)
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


def _run_program(
    program: str, timeout_s: float, limits: Limits, use_namespaces: bool
) -> SandboxResult:
    """:func:`run_program`, with the namespace layer optional (tests run both ways)."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if limits.cpu_s < 1 or limits.memory_mb < 1 or limits.file_size_mb < 0:
        raise ValueError(f"invalid limits: {limits}")
    if limits.max_processes < 0 or limits.output_bytes < 0:
        raise ValueError(f"invalid limits: {limits}")
    started = time.monotonic()
    nonce = secrets.token_hex(16).encode("ascii")
    prefix = _isolation_prefix() if use_namespaces else []
    with tempfile.TemporaryDirectory(
        prefix="taskprune-sandbox-", ignore_cleanup_errors=True
    ) as root:
        program_path = os.path.join(root, "program.py")
        home, tmp = os.path.join(root, "home"), os.path.join(root, "tmp")
        try:
            with open(program_path, "w", encoding="utf-8") as handle:
                handle.write(program)
            os.mkdir(home)
            os.mkdir(tmp)
        except (OSError, UnicodeError) as exc:
            return _error(f"taskprune sandbox: could not prepare the sandbox: {exc!r}", started)
        marker_r, marker_w = os.pipe()
        config = {
            "root": root,
            "program": program_path,
            "marker_fd": marker_w,
            "cpu_s": limits.cpu_s,
            "memory_mb": limits.memory_mb,
            "file_size_mb": limits.file_size_mb,
            "max_processes": limits.max_processes,
        }
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": home,
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
        }
        command = [*prefix, sys.executable, "-I", "-B", "-c", _RUNNER_SOURCE, json.dumps(config)]
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=root,
                env=env,
                pass_fds=(marker_w,),
                close_fds=True,
                start_new_session=True,
            )
        except OSError as exc:
            os.close(marker_r)
            return _error(f"taskprune sandbox: could not start the runner: {exc!r}", started)
        finally:
            os.close(marker_w)
        try:
            assert proc.stdin is not None
            try:
                proc.stdin.write(nonce)
                proc.stdin.close()
            except OSError:
                pass  # the child is already gone; reported below as an error
            stdout, stderr, marker, timed_out = _supervise(
                proc, marker_r, timeout_s, limits.output_bytes
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
            os.close(marker_r)
        wall_s = time.monotonic() - started
    returncode = proc.returncode
    ready = marker.startswith(b"R")
    passed = not timed_out and returncode == 0 and marker == b"R" + nonce
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


def run_program(program: str, timeout_s: float = 3.0, limits: Limits = Limits()) -> SandboxResult:
    """Run one untrusted program in a fresh sandbox process and report whether it passed.

    Args:
        program: complete source text, e.g. ``prompt + completion + "\\n" + test +
            "\\ncheck(entry_point)\\n"`` for HumanEval, or MBPP code followed by its asserts.
        timeout_s: wall-clock limit in seconds; the whole process group is killed after it.
        limits: resource limits for the child.

    Returns:
        A :class:`SandboxResult`. Harness problems are reported as ``status="error"``
        rather than raised; only invalid arguments raise :class:`ValueError`.
    """
    return _run_program(program, timeout_s, limits, use_namespaces=True)


def run_many(
    programs: list[str], timeout_s: float = 3.0, limits: Limits = Limits(), workers: int = 2
) -> list[SandboxResult]:
    """Run :func:`run_program` over ``programs`` with ``workers`` threads; results keep input order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not programs:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(programs))) as pool:
        return list(pool.map(lambda program: run_program(program, timeout_s, limits), programs))
