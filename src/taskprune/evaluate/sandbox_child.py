"""Child side of taskprune's sandbox; the harness is :mod:`taskprune.evaluate.sandbox`.

This file is run by path as a script (``python -I -B sandbox_child.py STAGE CONFIG``), so it
must stay self-contained and use the standard library only: under ``-I`` the taskprune
package is not importable. Stages:

``setup`` runs as root (or as root of a fresh user namespace) inside the mount, PID, network
and IPC namespaces that ``unshare(1)`` created. It checks that the harness is alive, builds
the file-system view (every mount bind-remounted read-only and checked; empty read-only
tmpfs over ``/tmp``, ``/var/tmp``, ``/run``, the harness user's home and any directory
uid 65534 could not traverse, with the interpreter's, venv's and this file's trees bound
back; a minimal ``/dev``; a fresh ``/proc``; a size-limited tmpfs as the program's
directory), drops privileges for good (uid/gid 65534 and no groups as root; otherwise all
capabilities with ``SECBIT_NOROOT`` locked; an empty bounding set and ``no_new_privs``
either way), re-arms the parent-death signal (credential changes clear it) and checks the
harness again. Then it forgets ctypes and forks: the parent stays as the PID namespace's
init (reaps, and exits with the runner's status, ``128 + N`` for "killed by signal N"); the
child goes on as the ``run`` stage in the same interpreter (no second start-up).

``run`` is the runner proper (also started directly, without namespaces, when the kernel
layers are unavailable or a test wants the audit hook alone): it reads the completion nonce
and the program from stdin, writes the program to ``program.py`` in its directory, sets
resource limits, installs the audit hook and runs the program. Everything it relies on
after the program has started is bound to function locals or closures first, because the
program can rebind module attributes and builtins but not another frame's locals.
"""

import gc
import json
import os
import signal
import stat
import sys

try:
    import resource
except ImportError:  # not on this platform
    resource = None


# ======================================================================================
# Stage "setup": namespaces are already there (unshare); build the view, drop privileges
# ======================================================================================

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND = 32, 1024, 2048, 4096
_MS_REC, _MS_PRIVATE, _MS_RELATIME, _MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
_MS_LAZYTIME = 1 << 25
# per-mount options that must be kept on a bind remount (a user namespace may not clear
# the ones its parent set: they are "locked")
_KEPT_OPTIONS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC,
                 "noatime": _MS_NOATIME, "nodiratime": _MS_NODIRATIME,
                 "relatime": _MS_RELATIME, "strictatime": _MS_STRICTATIME,
                 "lazytime": _MS_LAZYTIME}
_PR_SET_PDEATHSIG, _PR_GET_PDEATHSIG, _PR_CAPBSET_DROP = 1, 2, 24
_PR_SET_SECUREBITS, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT = 28, 38, 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
# noroot, no_setuid_fixup, keep_caps_locked, no_cap_ambient_raise, each with its lock
_SECUREBITS = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80
_DEVICES = ("null", "zero", "full", "random", "urandom")


class _SetupError(Exception):
    pass


def _libc():
    import ctypes  # only in this stage's process image, which is replaced by exec

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                           ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]

    def call(what, function, *args):
        if function(*args) != 0:
            number = ctypes.get_errno()
            raise OSError(number, "%s: %s" % (what, os.strerror(number)))

    def mount(source, target, fstype, flags, data=None):
        encode = lambda value: None if value is None else os.fsencode(value)  # noqa: E731
        call("mount %s" % (target,), libc.mount, encode(source), encode(target),
             encode(fstype), flags, encode(data))

    def prctl(option, arg2=0):
        call("prctl(%d)" % (option,), libc.prctl, option, arg2, 0, 0, 0)

    def get_pdeathsig():
        value = ctypes.c_int(-1)
        call("prctl(PR_GET_PDEATHSIG)", libc.prctl, _PR_GET_PDEATHSIG,
             ctypes.addressof(value), 0, 0, 0)
        return value.value

    def clear_capabilities():
        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
        call("capset", libc.capset, ctypes.byref(header), data)

    return mount, prctl, get_pdeathsig, clear_capabilities


def _parent_chain_ok(stat_fd, harness_pid):
    """Whether unshare's parent process (held open as /proc/PID/stat) is alive and still the
    harness's child. Read while the host's /proc is mounted, and again after the death
    signal is re-armed, so a harness that died during setup is noticed."""
    os.lseek(stat_fd, 0, os.SEEK_SET)
    try:
        fields = os.read(stat_fd, 4096).decode("ascii", "replace").rpartition(")")[2].split()
    except OSError:  # ESRCH: it is gone
        return False
    return len(fields) > 1 and fields[0] not in ("Z", "X", "x") and int(fields[1]) == harness_pid


def _own_parent_stat_fd():
    with open("/proc/self/stat", "rb") as handle:
        fields = handle.read().decode("ascii", "replace").rpartition(")")[2].split()
    return os.open("/proc/%d/stat" % (int(fields[1]),), os.O_RDONLY | os.O_CLOEXEC)


def _unescape(field):
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo
    out, index = [], 0
    while index < len(field):
        if field[index] == "\\" and field[index + 1:index + 4].isdigit():
            out.append(chr(int(field[index + 1:index + 4], 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


def _mount_points():
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            fields = line.split()
            yield _unescape(fields[4]), fields[5].split(",")


def _make_all_read_only(mount):
    """Bind-remount every mount read-only, then check every reachable mount point."""
    count = 0
    for point, options in _mount_points():
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID
        for option in options:
            flags |= _KEPT_OPTIONS.get(option, 0)
        try:
            mount(None, point, None, flags)
            count += 1
        except OSError as exc:
            # ENOENT/EINVAL: the path now leads elsewhere (a mount hidden under a cover);
            # such a mount cannot be reached. Anything else is a failure; and the check
            # below catches any reachable mount that stayed writable.
            if exc.errno not in (2, 22):
                raise
    for point, _ in _mount_points():
        try:
            flags = os.statvfs(point).f_flag
        except OSError:
            continue
        if not flags & os.ST_RDONLY:
            raise _SetupError("%s is still writable after the read-only remount" % (point,))
    return count


def _build_view(cfg, mount, report):
    """The mount namespace: read-only everything, private covers, minimal /dev, /proc."""
    mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    o_path = os.O_PATH | os.O_CLOEXEC
    # Descriptors first: once a cover hides them, binds are made from /proc/self/fd/N.
    restores = [(path, os.open(path, o_path | os.O_DIRECTORY)) for path in cfg["restore"]]
    devices = [(name, os.open("/dev/" + name, o_path)) for name in _DEVICES]
    covers = [path for path in cfg["cover"] if os.path.isdir(path) and not os.path.islink(path)]
    for path in covers:
        mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
              "size=1m,nr_inodes=1024,mode=0755")
    os.umask(0o022)
    for path, fd in restores:  # needed trees (interpreter, venv, this file) under a cover
        if not os.path.isdir(path):
            os.makedirs(path, 0o755)
        mount("/proc/self/fd/%d" % (fd,), path, None, _MS_BIND | _MS_REC)
        os.close(fd)
    mount("tmpfs", "/dev", "tmpfs", _MS_NOSUID | _MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
    for name, fd in devices:
        os.close(os.open("/dev/" + name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
        mount("/proc/self/fd/%d" % (fd,), "/dev/" + name, None, _MS_BIND)
        os.close(fd)
    os.symlink("/proc/self/fd", "/dev/fd")
    for number, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink("/proc/self/fd/%d" % (number,), "/dev/" + name)
    os.mkdir("/dev/shm", 0o755)
    report["dev"] = "minimal"
    try:
        mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        report["proc"] = "fresh"
    except OSError:  # e.g. a container that masks parts of /proc: hide it instead
        mount("tmpfs", "/proc", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
              "size=4k,nr_inodes=4,mode=0555")
        report["proc"] = "hidden"
    root = cfg["root"]
    os.mkdir(root, 0o755)  # a mount point inside the (soon read-only) cover of /tmp
    report["read_only_mounts"] = _make_all_read_only(mount)
    mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
          "size=%dm,nr_inodes=%d,mode=0700,uid=%d,gid=%d"
          % (cfg["disk_mb"], cfg["inodes"], cfg["uid"], cfg["gid"]))
    report["quota_mb"] = cfg["disk_mb"]
    for name in ("home", "tmp"):
        path = os.path.join(root, name)
        os.mkdir(path, 0o700)
        os.chown(path, cfg["uid"], cfg["gid"])
    os.chdir(root)


def _drop_privileges(cfg, prctl, clear_capabilities, report):
    for cap in range(64):  # empty the bounding set while CAP_SETPCAP is still there
        try:
            prctl(_PR_CAPBSET_DROP, cap)
        except OSError:
            break  # EINVAL: past the last capability this kernel knows
    try:
        prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass  # kernels before 4.3 have no ambient set
    if cfg["mode"] == "root":
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])  # clears every capability
        report["dropped"] = "uid %d, gid %d, no groups" % (cfg["uid"], cfg["gid"])
    else:  # root of our own user namespace: no other uid is mapped, so drop capabilities
        prctl(_PR_SET_SECUREBITS, _SECUREBITS)  # exec must not grant them back to uid 0
        clear_capabilities()
        report["dropped"] = "all capabilities (user namespace)"
    prctl(_PR_SET_NO_NEW_PRIVS, 1)
    report["no_new_privs"] = True


def _setup_main(cfg):
    report = {}
    try:
        mount, prctl, get_pdeathsig, clear_capabilities = _libc()
        parent_stat = _own_parent_stat_fd()
        if not _parent_chain_ok(parent_stat, cfg["harness_pid"]):
            raise _SetupError("the harness is gone")
        _build_view(cfg, mount, report)
        _drop_privileges(cfg, prctl, clear_capabilities, report)
        # The kernel clears the parent-death signal on credential changes: arm it again,
        # then make sure unshare's parent (which has its own) was alive all along.
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if get_pdeathsig() != signal.SIGKILL:
            raise _SetupError("the parent-death signal did not stick")
        if not _parent_chain_ok(parent_stat, cfg["harness_pid"]):
            raise _SetupError("the harness is gone")
        os.close(parent_stat)
        report["pdeathsig"] = "SIGKILL"
    except Exception as exc:  # noqa: BLE001  (reported; the harness sees "error")
        os.write(2, ("taskprune sandbox: setup failed: %r\n" % (exc,)).encode())
        os._exit(3)
    run_cfg = dict(cfg["run"], setup=report)
    mount = prctl = get_pdeathsig = clear_capabilities = None
    for name in [name for name in sys.modules if name == "_ctypes" or
                 name == "ctypes" or name.startswith("ctypes.")]:
        del sys.modules[name]  # a fresh import is refused by the audit hook (_ctypes)
    child = os.fork()
    if child == 0:
        _run_main(run_cfg)  # the runner, in this interpreter: no second start-up
        os._exit(3)
    # The namespace's init: keep nothing the program could use, reap, report its status.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.close(run_cfg["marker_fd"])
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(3)
        except InterruptedError:
            continue
        if pid == child:
            if os.WIFSIGNALED(status):
                os._exit(128 + os.WTERMSIG(status))
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


# ======================================================================================
# Stage "run": the runner
# ======================================================================================


def _refuse(what):
    def refused(*args, **kwargs):
        raise PermissionError("taskprune sandbox: %s is not allowed" % what)
    return refused


def _read_input(nonce_len):
    """The nonce and the program, from stdin (the harness closes it after writing)."""
    chunks = []
    while True:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    data = b"".join(chunks)
    if len(data) < nonce_len:
        raise EOFError("the harness sent no nonce")
    return data[:nonce_len], data[nonce_len:]


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
        # Per user and ignored for root; with the uid drop it is enforced (threads too).
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
    import warnings

    with warnings.catch_warnings():  # e.g. "spwd is deprecated" on some builds
        warnings.simplefilter("ignore")
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
    # Flags that yield descriptors usable as dir_fd= (or for fchdir/*at tricks); O_TMPFILE
    # includes O_DIRECTORY. The "open" audit event carries no dir_fd, so the only defence
    # against dir_fd= is that no directory descriptor can be had at all.
    descriptor_flags = getattr(os, "O_PATH", 0) | getattr(os, "O_DIRECTORY", 0)
    o_accmode, o_rdonly = getattr(os, "O_ACCMODE", 3), os.O_RDONLY
    create_or_truncate = os.O_CREAT | os.O_TRUNC
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
        if type_(flags) is int_ and flags & descriptor_flags:
            refuse("opening with O_PATH, O_DIRECTORY or O_TMPFILE (%s)" % (text,))
        resolved = resolve(text)
        if under(resolved, "/proc"):
            refuse("opening %s" % (resolved,))
        if under(resolved, "/dev"):
            if resolved in safe_devices:
                return
            refuse("opening %s" % (resolved,))
        # Directory descriptors would make dir_fd= arguments usable. The kernel hands one
        # out for a read-only access mode without O_CREAT/O_TRUNC, whatever else is set
        # (O_RDONLY | O_APPEND included); other opens of a directory fail with EISDIR
        # (and NamedTemporaryFile passes its directory to open(..., "w", opener=...)).
        if type_(flags) is not int_ or (
                flags & o_accmode == o_rdonly and not flags & create_or_truncate):
            try:
                is_dir = S_ISDIR(stat_path(resolved).st_mode)
            except OSError:
                is_dir = False
            if is_dir:
                refuse("opening a directory (%s)" % (resolved,))
        writing = False
        if type_(flags) is int_:
            writing = flags & write_flags
        if not writing and type_(mode) is str_:
            for char in "wax+":
                if char in mode:
                    writing = True
        if writing and not inside(resolved):
            refuse("writing %s (outside the sandbox directory)" % (resolved,))

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


def _probe_facts(cfg):
    """What this process can observe about its confinement (the harness's isolation probe).

    Runs before any program and before the audit hook; printed as JSON on stdout.
    """
    import socket
    import secrets as secrets_module

    facts = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
             "groups": os.getgroups(), "pid": os.getpid(), "setup": cfg.get("setup")}
    status = {}
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                status[key] = value.strip()
    except OSError:
        pass
    facts["cap_eff"] = int(status["CapEff"], 16) if "CapEff" in status else None
    facts["no_new_privs"] = status.get("NoNewPrivs") == "1"
    namespaces = {}
    for name in ("mnt", "pid", "net", "ipc", "user"):
        try:
            namespaces[name] = os.stat("/proc/self/ns/" + name).st_ino
        except OSError:
            namespaces[name] = None
    facts["ns"] = namespaces
    token = ".taskprune-probe-" + secrets_module.token_hex(8)
    writable = []
    for directory in cfg.get("probe_dirs", ()):
        path = os.path.join(directory, token)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            continue
        os.close(fd)
        os.unlink(path)
        writable.append(directory)
    facts["writable"] = writable
    try:
        with open(token, "w") as handle:
            handle.write("x")
        os.unlink(token)
        facts["cwd_writable"] = True
    except OSError:
        facts["cwd_writable"] = False
    facts["cwd"] = os.getcwd()
    try:
        info = os.statvfs(".")
        facts["cwd_bytes"] = info.f_blocks * info.f_frsize
    except OSError:
        facts["cwd_bytes"] = None
    try:
        facts["interfaces"] = [name for _, name in socket.if_nameindex()]
    except OSError:
        facts["interfaces"] = None
    return facts


def _prepare(cfg, secret, main_frame):
    """Everything before the program runs. Returns the vault; the nonce stays inside it."""
    root = os.path.realpath(os.getcwd())
    import_dirs = []
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            directory = os.path.realpath(entry)
            if directory != root and not directory.startswith(root + "/"):
                import_dirs.append(directory)
    if cfg["audit_hook"]:
        _disable_unaudited()
    _set_limits(cfg)
    vault = _vault(cfg["marker_fd"], secret, main_frame, sys._getframe, os.getpid, os.write)
    next(vault)
    secret = None
    if cfg["audit_hook"]:
        sys.addaudithook(_make_hook(root, vault, cfg["max_processes"], tuple(import_dirs)))
    return vault


def _run_main(cfg):
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
        parent = cfg.get("harness_pid")
        if parent is not None and os.getppid() != parent:
            raise RuntimeError("the harness is gone")  # it died before the death signal
        marker_fd = cfg["marker_fd"]
        secret, source = _read_input(cfg["nonce_len"])
        if cfg.get("probe"):
            out_.write(json.dumps(_probe_facts(cfg)))
            out_.flush()
            write_(marker_fd, b"R")
            exit_(0)
        program_path = os.path.join(os.getcwd(), "program.py")
        with open(program_path, "wb") as handle:
            handle.write(source)
        module = type_(sys)("__main__")
        module.__file__ = program_path
        module.__builtins__ = __builtins__
        namespace = module.__dict__
        sys.modules["__main__"] = module
        sys.argv = [program_path]
        vault = _prepare(cfg, secret, main_frame)
        secret = None
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


def _entry():
    if len(sys.argv) != 3 or sys.argv[1] not in ("setup", "run"):
        os.write(2, b"usage: sandbox_child.py setup|run CONFIG_JSON\n")
        os._exit(2)
    stage, cfg_text = sys.argv[1], sys.argv[2]
    del sys.argv[1:]
    if stage == "setup":
        _setup_main(json.loads(cfg_text))
    else:
        _run_main(json.loads(cfg_text))


if __name__ == "__main__":
    _entry()
