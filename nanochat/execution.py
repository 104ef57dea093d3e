"""The sandbox: run untrusted generated Python in a separate process and report what happened.

Used for HumanEval checks and for the chat model's Python/calculator tool.

    result = execute_code("print(1 + 1)")
    result.status, result.stdout   # ("passed", "2\\n")

How a run is contained, outermost first:
- A fresh interpreter (`python -I -S -B`: no environment variables, no site-packages, no
  bytecode writes) in a new session, so the whole process group is SIGKILLed on timeout,
  on an output flood, and once more after every run to reap anything left behind.
- OS resource limits set between fork and exec: address space (RLIMIT_AS), CPU seconds,
  file size, no core dumps, and a small RLIMIT_NPROC (per user, and not enforced for root).
- A scrubbed environment (PATH, LANG, HOME and TMPDIR only) and a throwaway working directory
  that is deleted afterwards.
- A Python-level prelude that runs before the user code: fork/exec/spawn/subprocess (and so
  multiprocessing), os.kill/os.killpg, new sessions, creating sockets, writes and deletes
  outside the working directory, and `import ctypes` all raise.

Be honest about the last layer: a Python-level prelude is NOT a security boundary against
a determined attacker. Code can dig the original functions back out (`_imp.create_builtin`,
`io.FileIO`, C extensions such as sqlite3 that open files themselves, ...). It stops generated
code that is merely careless or naive. Reads are not restricted at all, and as root the OS
limits do not stop a process from touching other processes. The OS limits, the process-group
kill, the scrubbed environment and the temp dir are the backstops; for hostile code, run this
as an unprivileged user inside a container or VM. The result channel is forgeable the same
way, so a "passed" from hostile code is only as trustworthy as the prelude.

Protocol: this file is also the child's entry point (`python -I -S -B execution.py FD`), so
both halves read in one place. The child reads the code from stdin, installs the prelude, runs
the code, and writes one JSON report {"status", "error"} to pipe FD; the parent reads stdout,
stderr and that pipe incrementally with caps. The child runs without site-packages, so this
module must import only the standard library.
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
import math
import os
import posix
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass, replace
from typing import Any, Callable

# Per user, so it also counts the user's other processes; as root it is not enforced at all,
# which is why the prelude blocks process creation too.
_MAX_USER_PROCESSES = 64
_MAX_FILE_BYTES = 16 * 1024 * 1024
# The child's report is one short JSON line; anything bigger is garbage written to its pipe.
_MAX_REPORT_BYTES = 64 * 1024
_MAX_ERROR_CHARS = 2000
# After a kill, how long to keep reading what the dying processes already wrote.
_DRAIN_SECONDS = 1.0
# How often to check whether the child exited while something it left behind holds the pipes.
_POLL_SECONDS = 0.1
_READ_CHUNK_BYTES = 64 * 1024
# Freed when the user code hits the memory limit, so the child can still write its report.
_RESERVE_BYTES = 4 * 1024 * 1024


@dataclass
class ExecutionResult:
    """What happened to one sandboxed run.

    status: "passed" (ran to completion, exit 0), "failed" (raised; error is "ExcType: message"),
    "timeout" (wall clock exceeded) or "error" (the sandbox hit a limit or the process died).
    """

    status: str
    stdout: str
    stderr: str
    error: str | None

    @property
    def success(self) -> bool:
        return self.status == "passed"


def execute_code(code: str, timeout: float = 5.0, memory_limit_mb: int = 256,
                 max_output_bytes: int = 64_000) -> ExecutionResult:
    """Run `code` in a fresh sandboxed interpreter and return its status and output.

    timeout is wall-clock seconds, interpreter start included; memory_limit_mb caps the child's
    address space; max_output_bytes caps stdout and stderr each (the run is killed past it).
    """
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if memory_limit_mb <= 0:
        raise ValueError(f"memory_limit_mb must be positive, got {memory_limit_mb!r}")
    if max_output_bytes <= 0:
        raise ValueError(f"max_output_bytes must be positive, got {max_output_bytes!r}")

    workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    report_read, report_write = os.pipe()
    # An unlinked file as stdin: the code never sits anywhere the child could rewrite it.
    with tempfile.TemporaryFile() as code_file:
        code_file.write(code.encode("utf-8"))
        code_file.seek(0)
        try:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__),
                     str(report_write)],
                    stdin=code_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    cwd=workdir, env=_child_environment(workdir),
                    start_new_session=True, pass_fds=(report_write,),
                    preexec_fn=_resource_limiter(memory_limit_mb, timeout),
                )
            finally:
                # The child has its own copy; ours must go so the pipe reads EOF when it exits.
                os.close(report_write)
            with proc:
                streams = _read_streams(proc, report_read, timeout, max_output_bytes)
        finally:
            os.close(report_read)
            # Leftovers in a private temp dir are not worth failing the run over.
            shutil.rmtree(workdir, ignore_errors=True)
    return _result(streams, proc.returncode, timeout, max_output_bytes)


def run_humaneval_check(problem: dict, completion: str, timeout: float = 5.0) -> ExecutionResult:
    """Run a HumanEval problem's tests against `completion` (the body that follows the prompt).

    The program is prompt + completion + test + check(entry_point). "passed" also requires
    check() to have returned: a completion that exits early (sys.exit(0)) is "failed".
    """
    missing = [key for key in ("prompt", "test", "entry_point") if key not in problem]
    if missing:
        raise KeyError(f"HumanEval problem is missing {missing}; it has {sorted(problem)}")
    # Printed only after check() returns; random so the completion cannot print it by accident.
    marker = f"humaneval-check-returned-{secrets.token_hex(8)}"
    program = (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
               + f"check({problem['entry_point']})\nprint({marker!r})\n")
    result = execute_code(program, timeout=timeout)
    if result.status != "passed":
        return result
    if marker not in result.stdout:
        return replace(result, status="failed", error="program exited before check() returned")
    return replace(result, stdout=result.stdout.replace(marker + "\n", ""))


# ------------------------------------------------------------------------------------------
# Parent side


def _child_environment(workdir: str) -> dict[str, str]:
    # Nothing of the parent's environment (tokens, keys) crosses over. PYTHONHASHSEED and the
    # other PYTHON* variables would be inert: -I makes the child ignore them.
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}


def _resource_limiter(memory_limit_mb: int, timeout: float) -> Callable[[], None]:
    """The preexec_fn: set the child's rlimits between fork and exec.

    Everything is computed here in the parent, so the forked child only calls setrlimit
    (no imports, no locks: safe even when the parent has threads).
    """
    memory_bytes = memory_limit_mb * 1024 * 1024
    # A backstop for the wall-clock timeout: SIGXCPU after this much CPU, SIGKILL a second later.
    cpu_seconds = math.ceil(timeout) + 1
    limits = [
        (resource.RLIMIT_CPU, _lowered(resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1)),
        (resource.RLIMIT_NPROC, _lowered(resource.RLIMIT_NPROC, _MAX_USER_PROCESSES)),
        (resource.RLIMIT_FSIZE, _lowered(resource.RLIMIT_FSIZE, _MAX_FILE_BYTES)),
        (resource.RLIMIT_CORE, _lowered(resource.RLIMIT_CORE, 0)),
        # Last: past this point the forked copy of a large parent may not be able to allocate.
        (resource.RLIMIT_AS, _lowered(resource.RLIMIT_AS, memory_bytes)),
    ]

    def set_limits() -> None:
        for which, soft_hard in limits:
            resource.setrlimit(which, soft_hard)

    return set_limits


def _lowered(which: int, soft: int, hard: int | None = None) -> tuple[int, int]:
    # An unprivileged process cannot raise its hard limit, so never ask for more than it has.
    _, current_hard = resource.getrlimit(which)
    hard = soft if hard is None else hard
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    return soft, hard


@dataclass
class _Streams:
    stdout: bytes
    stderr: bytes
    report: bytes
    timed_out: bool
    overflowed: str | None  # which stream passed its cap


def _read_streams(proc: subprocess.Popen, report_fd: int, timeout: float,
                  max_output_bytes: int) -> _Streams:
    """Read the child's pipes until they close, the deadline passes, or a stream overflows.

    Reads incrementally and keeps at most the cap per stream, so a flood cannot blow up the
    parent's memory. Whatever ends the run, the process group is killed before returning.
    """
    assert proc.stdout is not None and proc.stderr is not None
    names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr", report_fd: "report"}
    caps = {"stdout": max_output_bytes, "stderr": max_output_bytes, "report": _MAX_REPORT_BYTES}
    buffers = {name: bytearray() for name in caps}
    timed_out, overflowed, killed = False, None, False
    deadline = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as selector:
            for fd in names:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if killed and remaining <= 0:
                    break  # the drain after the kill is over
                ready = selector.select(max(0.0, min(remaining, _POLL_SECONDS)))
                for key, _ in ready:
                    chunk = os.read(key.fd, _READ_CHUNK_BYTES)
                    if not chunk:
                        selector.unregister(key.fd)
                        continue
                    name = names[key.fd]
                    kept = chunk[: caps[name] - len(buffers[name])]
                    buffers[name] += kept
                    if len(kept) < len(chunk) and not killed:
                        overflowed = overflowed or name
                if killed:
                    continue
                timed_out = remaining <= 0
                # The child exited, but something it left behind still holds the pipes open.
                straggling = not ready and _has_exited(proc.pid)
                if timed_out or overflowed or straggling:
                    _kill_group(proc.pid)
                    killed = True
                    deadline = time.monotonic() + _DRAIN_SECONDS
    finally:
        _kill_group(proc.pid)
    return _Streams(bytes(buffers["stdout"]), bytes(buffers["stderr"]), bytes(buffers["report"]),
                    timed_out, overflowed)


def _has_exited(pid: int) -> bool:
    # WNOWAIT leaves the child unreaped, so its pid (the process group id) cannot be reused
    # before _kill_group runs.
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group is already gone
        pass


def _result(streams: _Streams, returncode: int, timeout: float,
            max_output_bytes: int) -> ExecutionResult:
    stdout = streams.stdout.decode("utf-8", errors="replace")
    stderr = streams.stderr.decode("utf-8", errors="replace")

    def result(status: str, error: str | None) -> ExecutionResult:
        return ExecutionResult(status=status, stdout=stdout, stderr=stderr, error=error)

    if streams.timed_out:
        return result("timeout", f"timed out after {timeout} s")
    if streams.overflowed == "report":
        return result("error", f"result channel overflow (over {_MAX_REPORT_BYTES} bytes)")
    if streams.overflowed:
        return result("error", f"output limit exceeded ({streams.overflowed} over "
                               f"{max_output_bytes} bytes)")
    if returncode < 0:
        signal_name = signal.Signals(-returncode).name
        if -returncode == signal.SIGXCPU:
            return result("error", f"CPU time limit exceeded (killed by {signal_name})")
        return result("error", f"killed by signal {signal_name}")
    report = _parse_report(streams.report)
    if report is None:
        return result("error", f"sandbox exited with code {returncode} without reporting a result")
    return result(report["status"], report["error"])


def _parse_report(raw: bytes) -> dict[str, Any] | None:
    """The child's {"status", "error"} report, or None if missing or malformed."""
    try:
        report = json.loads(raw)
    except ValueError:
        return None
    if (not isinstance(report, dict) or report.get("status") not in ("passed", "failed", "error")
            or not isinstance(report.get("error"), (str, type(None)))):
        return None
    return report


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


def _child_main(report_fd: int) -> int:
    """Read the code from stdin, install the prelude, run the code, write the report."""
    code = sys.stdin.buffer.read().decode("utf-8")
    _install_prelude(root=os.path.realpath(os.getcwd()))
    # Tracebacks show the generated source lines.
    linecache.cache["<generated>"] = (len(code), None, code.splitlines(True), "<generated>")
    # A fresh __main__, so user classes pickle and dataclass/typing lookups find their module.
    main_module = types.ModuleType("__main__")
    sys.modules["__main__"] = main_module
    reserve = bytearray(_RESERVE_BYTES)
    try:
        exec(compile(code, "<generated>", "exec"), main_module.__dict__)
        status, error = "passed", None
    except BaseException as exc:  # noqa: BLE001 - everything the user code raises is reported
        del reserve
        status, error = _classify(exc)
        if isinstance(exc, SystemExit):
            # Like the interpreter: sys.exit("message") prints the message, sys.exit(3) nothing.
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.__stderr__)
        else:
            # Skip this frame: the user's traceback starts in <generated>.
            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next,
                                      file=sys.__stderr__)
    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is not None and not stream.closed:
            stream.flush()
    report = json.dumps({"status": status, "error": error}).encode()
    while report:
        report = report[os.write(report_fd, report):]
    os.close(report_fd)
    return 0 if status == "passed" else 1


def _classify(exc: BaseException) -> tuple[str, str | None]:
    if isinstance(exc, SystemExit) and exc.code in (None, 0):
        return "passed", None
    if isinstance(exc, MemoryError):
        return "error", "memory limit exceeded"
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return "error", f"file size limit exceeded ({_MAX_FILE_BYTES} bytes)"
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the report
        message = "<exception str() failed>"
    name = type(exc).__name__
    error = f"{name}: {message}" if message else name
    return "failed", error[:_MAX_ERROR_CHARS]


def _install_prelude(root: str) -> None:
    """Best-effort Python-level guards; see the module docstring for what they do not stop."""

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

    for name in ("ctypes", "_ctypes"):
        sys.modules.pop(name, None)
    sys.meta_path.insert(0, ImportBlocker())
    # -S skips site, which is what defines exit() and quit(); scripts call them.
    builtins.exit = builtins.quit = sys.exit


if __name__ == "__main__":
    sys.exit(_child_main(report_fd=int(sys.argv[1])))
