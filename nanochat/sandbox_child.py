"""The sandboxed child of nanochat/execution.py: it runs as `python -I -S -B sandbox_child.py
CONFIG` inside the sandbox, reads the code from stdin, hardens itself (seccomp), installs the
Python-level prelude, runs the code and writes one JSON report {"status", "error"} to the
report fd. For a HumanEval check it also serves the solution's function ("serve") or calls it
from the tests ("check") over two pipes, passing plain data only.

It runs without site-packages and without the nanochat package, so it imports only the
standard library, and only what the child needs (every import is paid on every run).
"""

from __future__ import annotations

import _io
import _posixsubprocess
import _socket
import builtins
import errno
import io
import json
import linecache
import os
import posix
import struct
import subprocess
import sys
import traceback
import types

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

MAX_FILE_BYTES = 16 * 1024 * 1024  # RLIMIT_FSIZE, set by the parent
MAX_ERROR_CHARS = 2000
# One call or reply between a HumanEval check and the solution (plain data, JSON).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
EXITED_EARLY = "program exited before check() returned"
SECCOMP_FAILED = "sandbox: could not install the seccomp filter"
_READ_CHUNK_BYTES = 64 * 1024
# Freed when the user code hits the memory limit, so the child can still write its report.
_RESERVE_BYTES = 4 * 1024 * 1024


# ------------------------------------------------------------------------------------------
# The seccomp filter: a classic BPF program, built in the child (it knows its own pid).

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# Syscall numbers (asm/unistd_64.h for x86_64, asm-generic/unistd.h for aarch64).
_SYSCALLS = {
    "x86_64": {
        "execve": 59, "execveat": 322, "fork": 57, "vfork": 58, "clone": 56, "clone3": 435,
        "socket": 41, "socketpair": 53, "kill": 62, "tkill": 200, "tgkill": 234,
        "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297, "pidfd_open": 434,
        "pidfd_send_signal": 424, "pidfd_getfd": 438, "ptrace": 101, "process_vm_readv": 310,
        "process_vm_writev": 311, "kcmp": 312, "setsid": 112, "setpgid": 109, "unshare": 272,
        "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "move_mount": 429,
        "open_tree": 428, "mount_setattr": 442, "bpf": 321, "perf_event_open": 298,
        "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "keyctl": 250, "add_key": 248, "request_key": 249,
        "open_by_handle_at": 304, "name_to_handle_at": 303, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320,
        "reboot": 169, "swapon": 167, "swapoff": 168, "acct": 163, "syslog": 103,
        "quotactl": 179, "quotactl_fd": 443, "iopl": 172, "ioperm": 173, "settimeofday": 164,
        "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159, "sethostname": 170,
        "setdomainname": 171, "mknod": 133, "mknodat": 259, "personality": 135, "uselib": 134,
        "lookup_dcookie": 212, "vhangup": 153,
    },
    "aarch64": {
        "execve": 221, "execveat": 281, "clone": 220, "clone3": 435, "socket": 198,
        "socketpair": 199, "kill": 129, "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138,
        "rt_tgsigqueueinfo": 240, "pidfd_open": 434, "pidfd_send_signal": 424,
        "pidfd_getfd": 438, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
        "kcmp": 272, "setsid": 157, "setpgid": 154, "unshare": 97, "setns": 268, "mount": 40,
        "umount2": 39, "pivot_root": 41, "chroot": 51, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428,
        "mount_setattr": 442, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "keyctl": 219, "add_key": 217, "request_key": 218, "open_by_handle_at": 265,
        "name_to_handle_at": 264, "init_module": 105, "finit_module": 273,
        "delete_module": 106, "kexec_load": 104, "kexec_file_load": 294, "reboot": 142,
        "swapon": 224, "swapoff": 225, "acct": 89, "syslog": 116, "quotactl": 60,
        "quotactl_fd": 443, "settimeofday": 170, "clock_settime": 112, "clock_adjtime": 266,
        "adjtimex": 171, "sethostname": 161, "setdomainname": 162, "mknodat": 33,
        "personality": 92, "lookup_dcookie": 18, "vhangup": 58,
    },
}
# Refused outright with EPERM: starting programs and processes, creating sockets, reaching into
# other processes, and the kernel's administrative and rarely-needed attack surface.
_SECCOMP_DENIED = (
    "execve", "execveat", "fork", "vfork", "socket", "tkill", "pidfd_open", "pidfd_send_signal",
    "pidfd_getfd", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "setsid",
    "setpgid", "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "fsopen",
    "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr", "bpf",
    "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "open_by_handle_at", "name_to_handle_at",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "acct", "syslog", "quotactl", "quotactl_fd", "iopl", "ioperm",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
    "setdomainname", "mknod", "mknodat", "personality", "uselib", "lookup_dcookie", "vhangup",
)
_CLONE_THREAD = 0x00010000
# CLONE_NEWTIME, NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
_CLONE_NAMESPACES = (0x00000080 | 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000
                     | 0x10000000 | 0x20000000 | 0x40000000)
_AF_UNIX = 1
_X32_SYSCALL_BIT = 0x40000000
_RET_KILL_PROCESS, _RET_ALLOW, _RET_ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_NR_OFFSET, _ARCH_OFFSET, _ARG0_OFFSET = 0, 4, 16  # in struct seccomp_data (little-endian)


def seccomp_arch() -> str | None:
    machine = os.uname().machine
    return machine if machine in _SYSCALLS and sys.byteorder == "little" else None


def seccomp_program(own_pid: int) -> bytes:
    """The filter: EPERM for _SECCOMP_DENIED and for what the argument rules below refuse.

    clone only makes threads (CLONE_THREAD, no namespace flags); clone3 says ENOSYS so the C
    library falls back to clone; socketpair only AF_UNIX (asyncio's self-pipe); signals only to
    this process (kill(own pid or 0), tgkill/rt_sig*queueinfo(own pid)). A syscall of another
    architecture or ABI (x32) kills the process.
    """
    arch = seccomp_arch()
    assert arch is not None
    numbers = _SYSCALLS[arch]
    program: list[tuple[int, int, int, int]] = []  # (code, jt, jf, k)

    def emit(code: int, k: int, jt: int = 0, jf: int = 0) -> None:
        program.append((code, jt, jf, k))

    deny, allow = _RET_ERRNO | errno.EPERM, _RET_ALLOW
    emit(_LD_ABS, _ARCH_OFFSET)
    emit(_JEQ, _AUDIT_ARCH[arch], jt=1)
    emit(_RET, _RET_KILL_PROCESS)
    emit(_LD_ABS, _NR_OFFSET)
    if arch == "x86_64":
        emit(_JGE, _X32_SYSCALL_BIT, jf=1)
        emit(_RET, _RET_KILL_PROCESS)
    for name in _SECCOMP_DENIED:
        if name in numbers:
            emit(_JEQ, numbers[name], jf=1)
            emit(_RET, deny)
    emit(_JEQ, numbers["clone3"], jf=1)
    emit(_RET, _RET_ERRNO | errno.ENOSYS)
    # Each block below ends in a return on every path, so A still holds the number after it.
    emit(_JEQ, numbers["clone"], jf=5)
    emit(_LD_ABS, _ARG0_OFFSET)
    emit(_JSET, _CLONE_NAMESPACES, jt=2)
    emit(_JSET, _CLONE_THREAD, jf=1)
    emit(_RET, allow)
    emit(_RET, deny)
    emit(_JEQ, numbers["socketpair"], jf=4)
    emit(_LD_ABS, _ARG0_OFFSET)
    emit(_JEQ, _AF_UNIX, jf=1)
    emit(_RET, allow)
    emit(_RET, deny)
    emit(_JEQ, numbers["kill"], jf=5)
    emit(_LD_ABS, _ARG0_OFFSET)
    emit(_JEQ, own_pid, jt=2)
    emit(_JEQ, 0, jt=1)
    emit(_RET, deny)
    emit(_RET, allow)
    for name in ("tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        emit(_JEQ, numbers[name], jf=4)
        emit(_LD_ABS, _ARG0_OFFSET)
        emit(_JEQ, own_pid, jf=1)
        emit(_RET, allow)
        emit(_RET, deny)
    emit(_RET, allow)
    return b"".join(struct.pack("<HBBI", code, jt, jf, k) for code, jt, jf, k in program)


# ------------------------------------------------------------------------------------------
# Child side: runs as __main__ in the sandboxed interpreter.

# Process creation, signalling other processes, and leaving the process group.
_BLOCKED_OS_FUNCTIONS = (
    "fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp",
    "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
    "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
    "kill", "killpg", "pidfd_open", "setsid", "setpgid", "setpgrp",
)
# os function -> its (position, keyword) parameters naming a path it creates, changes or deletes.
_WRITE_PATH_PARAMS: dict[str, tuple[tuple[int, str], ...]] = {
    **{name: ((0, "path"),) for name in (
        "remove", "unlink", "rmdir", "mkdir", "mkfifo", "mknod", "chmod", "chown", "lchown",
        "utime", "truncate", "setxattr", "removexattr")},
    **{name: ((0, "fd"),) for name in ("fchmod", "fchown")},
    **{name: ((0, "src"), (1, "dst")) for name in ("rename", "replace", "link")},
    "symlink": ((1, "dst"),),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# ctypes reaches any C function; the native modules the prelude patches must not be
# re-imported fresh (del sys.modules[...]; import ...) to get the originals back.
_BLOCKED_IMPORTS = frozenset({"ctypes", "_ctypes", "posix", "_posixsubprocess", "_socket", "_io"})
# Exceptions from the solution that a check sees as themselves; any other is CandidateError.
_REMOTE_EXCEPTIONS = {cls.__name__: cls for cls in (
    ArithmeticError, AssertionError, AttributeError, IndexError, KeyError, LookupError,
    NameError, NotImplementedError, OverflowError, RecursionError, RuntimeError, TypeError,
    UnboundLocalError, ValueError, ZeroDivisionError)}


class CandidateError(Exception):
    """In a HumanEval check: the solution raised something else, or answered garbage."""


class _CandidateExited(Exception):
    """In a HumanEval check: the solution's process ended before answering."""


def child_main(config: dict[str, Any]) -> int:
    """Read the code from stdin, harden the process, install the prelude, run, report."""
    report_fd = config["report"]
    mode = config["mode"]
    code = sys.stdin.buffer.read().decode("utf-8")
    os.environ.pop("PWD", None)  # bwrap sets it; the environment is exactly the parent's four
    if config.get("become") is not None:
        try:
            _become(config["become"])
        except OSError as exc:
            _write_report(report_fd, "error", f"sandbox: could not drop privileges: {exc}")
            return 1
    try:
        _harden(config["seccomp"])
    except OSError as exc:
        _write_report(report_fd, "error", f"{SECCOMP_FAILED}: {exc}")
        return 1
    _install_prelude(root=os.path.realpath(os.getcwd()))
    # Tracebacks show the generated source lines.
    linecache.cache["<generated>"] = (len(code), None, code.splitlines(True), "<generated>")
    # A fresh __main__, so user classes pickle and dataclass/typing lookups find their module.
    main_module = types.ModuleType("__main__")
    sys.modules["__main__"] = main_module
    reserve = bytearray(_RESERVE_BYTES)
    try:
        exec(compile(code, "<generated>", "exec"), main_module.__dict__)
        if mode == "serve":
            _serve(main_module.__dict__.get(config["entry_point"]), config["calls"],
                   config["replies"])
        elif mode == "check":
            candidate = _candidate(config["entry_point"], config["replies"], config["calls"])
            main_module.__dict__[config["entry_point"]] = candidate
            main_module.__dict__["check"](candidate)
        status, error = "passed", None
    except BaseException as exc:  # noqa: BLE001 - everything the user code raises is reported
        del reserve
        status, error = _classify(exc, exit_passes=mode != "check")
        if isinstance(exc, SystemExit):
            # Like the interpreter: sys.exit("message") prints the message, sys.exit(3) nothing.
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.__stderr__)
        elif not isinstance(exc, _CandidateExited):
            # Skip this frame: the user's traceback starts in <generated>.
            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next,
                                      file=sys.__stderr__)
    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is not None and not stream.closed:
            stream.flush()
    _write_report(report_fd, status, error)
    return 0 if status == "passed" else 1


def _write_report(report_fd: int, status: str, error: str | None) -> None:
    report = json.dumps({"status": status, "error": error}).encode()
    while report:
        report = report[os.write(report_fd, report):]
    os.close(report_fd)


def _classify(exc: BaseException, exit_passes: bool = True) -> tuple[str, str | None]:
    if isinstance(exc, SystemExit) and exc.code in (None, 0) and exit_passes:
        return "passed", None
    if isinstance(exc, _CandidateExited):
        return "failed", EXITED_EARLY
    if isinstance(exc, MemoryError):
        return "error", "memory limit exceeded"
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return "error", f"file size limit exceeded ({MAX_FILE_BYTES} bytes)"
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the report
        message = "<exception str() failed>"
    name = type(exc).__name__
    error = f"{name}: {message}" if message else name
    return "failed", error[:MAX_ERROR_CHARS]


def _become(uid: int) -> None:
    """Under a root parent: leave root for `uid` (user and group), with no capabilities left."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)  # all of real, effective and saved: the capabilities go with root
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    if (os.getresuid() != (uid,) * 3 or os.getresgid() != (uid,) * 3
            or int(fields["CapEff"], 16) or int(fields["CapPrm"], 16)):
        raise OSError(errno.EPERM, f"still uid {os.getresuid()} gid {os.getresgid()} with "
                                   f"capabilities {fields['CapEff'].strip()}")


def _harden(seccomp: bool) -> None:
    """With seccomp, before any user code: no new privileges, not dumpable (no /proc/PID/mem
    or fd access by others), then the filter. Raises OSError if any step fails."""
    if not seccomp:
        return
    try:
        import ctypes  # the prelude below drops it from sys.modules and blocks re-importing it
    except ImportError as exc:
        raise OSError(errno.ENOSYS, f"ctypes is missing: {exc}") from None

    libc = ctypes.CDLL(None, use_errno=True)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    program = seccomp_program(os.getpid())
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.addressof(buffer))
    ulong = ctypes.c_ulong
    pr_set_dumpable, pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 4, 38, 22, 2
    for what, args in (("PR_SET_DUMPABLE", (pr_set_dumpable, ulong(0))),
                       ("PR_SET_NO_NEW_PRIVS", (pr_set_no_new_privs, ulong(1))),
                       ("PR_SET_SECCOMP", (pr_set_seccomp, ulong(seccomp_mode_filter),
                                           ctypes.byref(fprog)))):
        padded = args + (ulong(0),) * (5 - len(args))
        if libc.prctl(*padded) != 0:
            number = ctypes.get_errno()
            raise OSError(number, f"prctl({what}): {os.strerror(number)}")


def _serve(function: Any, calls_fd: int, replies_fd: int) -> None:
    """The solution's side of a HumanEval check: answer calls until the check hangs up.

    Only Exceptions become replies; SystemExit and the like end the process, as they would
    end the in-process check.
    """
    os.set_inheritable(calls_fd, False)
    os.set_inheritable(replies_fd, False)
    while True:
        call = _read_message(calls_fd)
        if call is None:
            return
        try:
            if not callable(function):
                raise NameError("the program does not define the entry point")
            args, kwargs = _decode(call["args"]), _decode(call["kwargs"])
            reply = {"value": _encode(function(*args, **kwargs))}
        except Exception as exc:  # noqa: BLE001 - the check decides what an exception means
            try:
                message = str(exc)[:MAX_ERROR_CHARS]
            except Exception:  # noqa: BLE001
                message = "<exception str() failed>"
            reply = {"raised": type(exc).__name__, "message": message}
        try:
            _write_message(replies_fd, reply)
        except ValueError as exc:  # too large to send
            _write_message(replies_fd, {"raised": "ValueError", "message": str(exc)})


def _candidate(name: str, replies_fd: int, calls_fd: int) -> Callable[..., Any]:
    """The check's side: a stand-in for the solution's function that calls it over the pipes."""

    def candidate(*args: Any, **kwargs: Any) -> Any:
        try:
            _write_message(calls_fd, {"args": _encode(list(args)), "kwargs": _encode(kwargs)})
        except BrokenPipeError:
            raise _CandidateExited(EXITED_EARLY) from None
        reply = _read_message(replies_fd)
        if reply is None:
            raise _CandidateExited(EXITED_EARLY)
        if isinstance(reply, dict) and reply.keys() == {"value"}:
            try:
                return _decode(reply["value"])
            except (TypeError, ValueError, RecursionError) as exc:
                raise CandidateError(f"the solution returned an unreadable value: {exc}") from None
        if (isinstance(reply, dict) and reply.keys() == {"raised", "message"}
                and isinstance(reply["raised"], str) and isinstance(reply["message"], str)):
            cls = _REMOTE_EXCEPTIONS.get(reply["raised"])
            if cls is not None:
                raise cls(reply["message"])
            raise CandidateError(f"{reply['raised'][:100]}: {reply['message']}")
        raise CandidateError("the solution answered something that is not a reply")

    candidate.__name__ = candidate.__qualname__ = name
    return candidate


def _write_message(fd: int, message: Any) -> None:
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(data)} bytes is over {MAX_MESSAGE_BYTES}")
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _read_message(fd: int) -> Any:
    """The next length-prefixed JSON message, or None at EOF (also mid-message)."""
    header = _read_exactly(fd, 4)
    if header is None:
        return None
    (length,) = struct.unpack(">I", header)
    if length > MAX_MESSAGE_BYTES:
        raise CandidateError(f"message of {length} bytes is over {MAX_MESSAGE_BYTES}")
    data = _read_exactly(fd, length)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CandidateError(f"unreadable message: {exc}") from None


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, min(remaining, _READ_CHUNK_BYTES))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


# Plain data only crosses between the check and the solution: JSON null/bool/int/float/str and
# lists as themselves, the other builtin containers tagged ({"tuple": [...]}, ...).
def _encode(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return None if value is None else bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list):
        return [_encode(item) for item in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(item) for item in value]}
    if isinstance(value, dict):
        return {"dict": [[_encode(key), _encode(item)] for key, item in value.items()]}
    if isinstance(value, (set, frozenset)):
        return {type(value).__name__ if type(value) in (set, frozenset) else "set":
                [_encode(item) for item in value]}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    raise TypeError(f"a {type(value).__name__} cannot be passed between the check and the "
                    "solution (plain data only)")


def _decode(value: Any) -> Any:
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) is list:
        return [_decode(item) for item in value]
    if type(value) is dict and len(value) == 1:
        (tag, items), = value.items()
        if tag == "bytes" and type(items) is str:
            return bytes.fromhex(items)
        if type(items) is not list:
            raise ValueError(f"tagged value {tag!r} without a list")
        if tag == "tuple":
            return tuple(_decode(item) for item in items)
        if tag in ("set", "frozenset"):
            return (set if tag == "set" else frozenset)(_decode(item) for item in items)
        if tag == "dict":
            if not all(type(pair) is list and len(pair) == 2 for pair in items):
                raise ValueError("dict items are not pairs")
            return {_decode(key): _decode(item) for key, item in items}
        if tag == "complex" and len(items) == 2 and all(type(x) is float for x in items):
            return complex(*items)
    raise ValueError(f"not a plain value: {str(value)[:100]}")


def _install_prelude(root: str) -> None:
    """Best-effort Python-level guards: the innermost layer, not a boundary on its own."""

    def blocked(what: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise PermissionError(f"{what} is not allowed in the sandbox")
        return refuse

    for name in _BLOCKED_OS_FUNCTIONS:
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, blocked(f"os.{name}"))
    # subprocess is already imported (this file imports it), holding fork_exec as _fork_exec.
    _posixsubprocess.fork_exec = subprocess._fork_exec = blocked("starting a process")
    subprocess.Popen = blocked("subprocess.Popen")

    allowed_outside = {os.devnull}

    def check_write(path: Any, dir_fd: int | None = None) -> None:
        if isinstance(path, int):  # an fd: resolve the file it refers to
            path = f"/proc/self/fd/{path}"
        path = os.fsdecode(os.fspath(path))
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.getcwd()
        real = os.path.realpath(os.path.join(base, path))
        if real in allowed_outside or real == root or real.startswith(root + os.sep):
            return
        raise PermissionError(errno.EACCES, "sandbox: writing outside the working directory "
                              f"{root} is not allowed", path)

    def guard_paths(function: Callable[..., Any], params: tuple[tuple[int, str], ...]
                    ) -> Callable[..., Any]:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            for position, keyword in params:
                path = args[position] if position < len(args) else kwargs.get(keyword)
                if path is not None:
                    check_write(path, kwargs.get(f"{keyword}_dir_fd", kwargs.get("dir_fd")))
            return function(*args, **kwargs)
        return guarded

    for name, params in _WRITE_PATH_PARAMS.items():
        if hasattr(os, name):
            guarded = guard_paths(getattr(os, name), params)
            for module in (os, posix):
                setattr(module, name, guarded)

    original_os_open = os.open

    def guarded_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & _WRITE_FLAGS:
            check_write(path, kwargs.get("dir_fd"))
        return original_os_open(path, flags, *args, **kwargs)

    os.open = posix.open = guarded_os_open

    original_open = builtins.open

    def guarded_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        # An int is an fd this process already holds; opening it again creates nothing.
        if not isinstance(file, int) and any(flag in mode for flag in "wax+"):
            check_write(file)
        return original_open(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open

    class NoNetworkSocket(_socket.socket):  # type: ignore[misc, valid-type]
        """Wrapping an existing fd is allowed (socketpair, which asyncio needs); creating is not.

        socket.socket.__init__ calls _socket.socket.__init__ by name, so this guards both.
        """

        __slots__ = ()  # socket.socket, subclassing this if imported later, adds __weakref__

        def __init__(self, family: int = -1, type: int = -1, proto: int = -1,
                     fileno: int | None = None) -> None:
            if fileno is None:
                raise PermissionError("network access is not allowed in the sandbox")
            super().__init__(family, type, proto, fileno)

    _socket.socket = NoNetworkSocket

    class ImportBlocker:
        """Meta path finder refusing the modules in _BLOCKED_IMPORTS."""

        def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
            if fullname.partition(".")[0] in _BLOCKED_IMPORTS:
                raise ImportError(f"import of {fullname!r} is blocked in the sandbox",
                                  name=fullname)

    for name in list(sys.modules):
        if name.partition(".")[0] in ("ctypes", "_ctypes"):
            del sys.modules[name]
    sys.meta_path.insert(0, ImportBlocker())
    # -S skips site, which is what defines exit() and quit(); scripts call them.
    builtins.exit = builtins.quit = sys.exit


if __name__ == "__main__":
    sys.exit(child_main(json.loads(sys.argv[1])))
