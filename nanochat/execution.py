"""The sandbox: run untrusted generated Python in an isolated process and report what happened.

Used for HumanEval checks (tasks/humaneval.py). The chat model's calculator tool does not run
here: it is a restricted in-process evaluator (nanochat/calculator.py).

    result = execute_code("print(1 + 1)")
    result.status, result.stdout   # ("passed", "2\\n")

Two isolation modes, chosen by `isolation=` or else the NANOCHAT_SANDBOX variable:
- "os" (the default): the operating system isolates the child. bubblewrap (`bwrap`, Debian
  `bubblewrap`) puts it in new mount, PID, network, IPC and UTS namespaces: it sees /usr and
  the Python install read-only, a private /proc and /dev, and a size-capped tmpfs as its only
  writable directory; it has no network and no capabilities, runs as `nobody` (under a root
  parent; else as the caller in a user namespace), and every process in it dies with it.
  Where bwrap is missing or the kernel refuses, every call raises SandboxUnavailable with one
  line; nothing falls back silently.
- "python": the weaker mode, only when asked for: a plain child process on the host
  filesystem, guarded by the layers below alone (docs/sandbox.md says what that leaves open).
Both modes add: rlimits (address space, CPU, file size, processes, core), a scrubbed
environment, stdin from an unlinked file, a seccomp filter where the kernel and architecture
allow it (no exec, fork, sockets, signals to other processes, ptrace, mount, namespaces, ...:
sandbox_child.seccomp_program), and the Python-level prelude as the innermost layer.

A HumanEval verdict never comes from the process running the generated code: the solution runs
in one sandbox and answers calls with plain data (JSON), the tests run in a second sandbox that
the solution cannot see, and only that one's report decides (run_humaneval_check).

The child half is nanochat/sandbox_child.py (`python -I -S -B sandbox_child.py CONFIG`,
standard library only): it reads the code from stdin, hardens itself, installs the prelude,
runs the code, and writes one JSON report {"status", "error"} to the report fd; the parent
reads stdout, stderr and that fd incrementally with caps. Threat model: docs/sandbox.md.
"""

from __future__ import annotations

import functools
import json
import math
import os
import resource
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

from nanochat import sandbox_child
from nanochat.config import UserError

ISOLATION_MODES = ("os", "python")
ISOLATION_ENV = "NANOCHAT_SANDBOX"
# Per user, so it also counts the user's other processes; as root it is not enforced at all,
# which is why the seccomp filter and the prelude block process creation too.
_MAX_USER_PROCESSES = 64
# The "os" mode's writable work dir is a tmpfs of this size (memory, gone with the sandbox).
_WORKDIR_BYTES = 64 * 1024 * 1024
# The child's report is one short JSON line; anything bigger is garbage written to its pipe.
_MAX_REPORT_BYTES = 64 * 1024
# After a kill, how long to keep reading what the dying processes already wrote.
_DRAIN_SECONDS = 1.0
# How often to check whether the child exited while something it left behind holds the pipes.
_POLL_SECONDS = 0.1
_READ_CHUNK_BYTES = 64 * 1024
# Paths inside the "os" sandbox.
_SANDBOX_WORKDIR = "/sandbox"
_SANDBOX_RUNNER = "/run/nanochat/sandbox_child.py"
_SANDBOX_UID = 65534  # nobody: what a root parent's "os" sandbox runs as
# What the parent waits for at most when it checks that the sandbox works at all.
_PROBE_TIMEOUT = 30.0


class SandboxUnavailable(UserError):
    """The requested isolation cannot run here; the one-line message says why and what to do."""


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


@dataclass(frozen=True)
class SandboxStatus:
    """Whether `isolation` works on this machine, and whether its seccomp filter is in force.

    reason says why not (available False), or why there is no seccomp filter (seccomp False).
    """

    isolation: str
    available: bool
    seccomp: bool
    reason: str | None


def execute_code(code: str, timeout: float = 5.0, memory_limit_mb: int = 256,
                 max_output_bytes: int = 64_000, isolation: str | None = None) -> ExecutionResult:
    """Run `code` in a fresh sandboxed interpreter and return its status and output.

    timeout is wall-clock seconds, interpreter start included; memory_limit_mb caps the child's
    address space; max_output_bytes caps stdout and stderr each (the run is killed past it).
    isolation is "os" or "python" (default: $NANOCHAT_SANDBOX, else "os"); raises
    SandboxUnavailable if it cannot run here.
    """
    _check_limits(timeout, memory_limit_mb, max_output_bytes)
    status = _require(isolation)
    return _execute(code, timeout, memory_limit_mb, max_output_bytes, status.isolation,
                    status.seccomp)


def run_humaneval_check(problem: dict, completion: str, timeout: float = 5.0,
                        memory_limit_mb: int = 256, isolation: str | None = None
                        ) -> ExecutionResult:
    """Run a HumanEval problem's tests against `completion` (the text that follows the prompt).

    The solution (prompt + completion) runs in one sandbox and serves calls to entry_point; the
    tests (prompt + test, then check(candidate)) run in another, where `candidate` sends the
    arguments over a pipe and gets the result back as plain data. "passed" means check()
    returned in the tests' sandbox, which the solution can neither see nor write to: printing
    a marker, exiting early, patching check() or returning an object equal to everything
    cannot pass. stdout/stderr are the solution's, then the tests'.
    """
    missing = [key for key in ("prompt", "test", "entry_point") if key not in problem]
    if missing:
        raise KeyError(f"HumanEval problem is missing {missing}; it has {sorted(problem)}")
    entry_point = problem["entry_point"]
    if not (isinstance(entry_point, str) and entry_point.isidentifier()):
        raise ValueError(f"HumanEval entry_point must be a Python name, got {entry_point!r}")
    _check_limits(timeout, memory_limit_mb, 64_000)
    status = _require(isolation)
    # Calls go tests -> solution on one pipe, results come back on the other.
    call_read, call_write = os.pipe()
    reply_read, reply_write = os.pipe()
    solution_config = {"mode": "serve", "entry_point": entry_point,
                       "calls": call_read, "replies": reply_write}
    check_config = {"mode": "check", "entry_point": entry_point,
                    "calls": call_write, "replies": reply_read}
    children: list[_Child] = []
    try:
        for code, config, fds in (
                (problem["prompt"] + completion + "\n", solution_config, (call_read, reply_write)),
                (problem["prompt"] + "\n" + problem["test"] + "\n", check_config,
                 (call_write, reply_read))):
            children.append(_spawn(code, config, fds, timeout, memory_limit_mb, 64_000,
                                   status.isolation, status.seccomp))
    except BaseException:
        for child in children:
            child.close()
        raise
    finally:
        # The children have their copies; the parent must hold none, so each side sees EOF
        # when the other one ends.
        for fd in (call_read, call_write, reply_read, reply_write):
            os.close(fd)
    solution_child, check_child = children
    _supervise(children, timeout, finisher=check_child)
    solution, check = (child.result(timeout) for child in children)
    stdout, stderr = solution.stdout + check.stdout, solution.stderr + check.stderr

    def result(status: str, error: str | None) -> ExecutionResult:
        return ExecutionResult(status=status, stdout=stdout, stderr=stderr, error=error)

    if check.status == "passed":
        return result("passed", None)
    if "timeout" in (check.status, solution.status):
        return result("timeout", f"timed out after {timeout} s")
    # The solution's own failure (a syntax error, a limit) explains the checker's better than
    # "program exited", unless the parent stopped it because the checker was done.
    if solution_child.ended_by != "stopped" and solution.status in ("failed", "error"):
        return result(solution.status, solution.error)
    return result(check.status, check.error)


def sandbox_status(isolation: str | None = None) -> SandboxStatus:
    """Whether `isolation` (default: $NANOCHAT_SANDBOX, else "os") runs here, and with seccomp.

    Probed once per process and mode, by a trivial run.
    """
    return _probe(_isolation(isolation))


@functools.lru_cache(maxsize=None)
def _probe(isolation: str) -> SandboxStatus:
    if isolation == "os":
        problem = _os_sandbox_problem()
        if problem:
            return SandboxStatus(isolation, False, False, problem)
    seccomp_reason = None if sandbox_child.seccomp_arch() else (
        f"no seccomp filter for the {os.uname().machine} architecture")
    if seccomp_reason is None:
        result = _execute("pass", _PROBE_TIMEOUT, 256, 64_000, isolation, seccomp=True)
        if result.success:
            return SandboxStatus(isolation, True, True, None)
        if not (result.error or "").startswith(sandbox_child.SECCOMP_FAILED):
            return SandboxStatus(isolation, False, False, _probe_failure(result))
        seccomp_reason = result.error
    result = _execute("pass", _PROBE_TIMEOUT, 256, 64_000, isolation, seccomp=False)
    if not result.success:
        return SandboxStatus(isolation, False, False, _probe_failure(result))
    return SandboxStatus(isolation, True, False, seccomp_reason)


# ------------------------------------------------------------------------------------------
# Parent side


def _check_limits(timeout: float, memory_limit_mb: int, max_output_bytes: int) -> None:
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if memory_limit_mb <= 0:
        raise ValueError(f"memory_limit_mb must be positive, got {memory_limit_mb!r}")
    if max_output_bytes <= 0:
        raise ValueError(f"max_output_bytes must be positive, got {max_output_bytes!r}")


def _isolation(isolation: str | None) -> str:
    if isolation is None:
        isolation = os.environ.get(ISOLATION_ENV) or "os"
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"{ISOLATION_ENV}: expected one of {'|'.join(ISOLATION_MODES)}, "
                             f"got {isolation!r}")
    elif isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation: expected one of {'|'.join(ISOLATION_MODES)}, "
                         f"got {isolation!r}")
    return isolation


def _require(isolation: str | None) -> SandboxStatus:
    status = sandbox_status(isolation)
    if not status.available:
        remedy = ("install bubblewrap (runs/setup_env.sh does), or set "
                  f"{ISOLATION_ENV}=python to accept the weaker Python-level guard"
                  if status.isolation == "os" else "see the reason")
        raise SandboxUnavailable(f"sandbox: {status.isolation} isolation is unavailable here "
                                 f"({status.reason}); {remedy} (docs/sandbox.md)")
    return status


def _probe_failure(result: ExecutionResult) -> str:
    lines = [line for line in (result.stderr or "").splitlines() if line.strip()]
    if lines:
        return lines[-1].strip()
    return f"a trivial run ended with {result.status}: {result.error}"


def _bwrap() -> str | None:
    return shutil.which("bwrap") or next(
        (path for path in ("/usr/bin/bwrap", "/bin/bwrap") if os.access(path, os.X_OK)), None)


def _python() -> str:
    # The base interpreter: the child uses the standard library only, never the venv.
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _python_trees() -> list[str]:
    """Host directories the "os" sandbox must see (read-only) for the interpreter to run."""
    trees = ["/usr"]
    for tree in (sys.base_prefix, sys.base_exec_prefix):
        tree = os.path.realpath(tree)
        if not any(tree == seen or tree.startswith(seen + os.sep) for seen in trees):
            trees.append(tree)
    return trees


def _os_sandbox_problem() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"bubblewrap needs Linux, this is {sys.platform}"
    if _bwrap() is None:
        return "bwrap not found"
    python = _python()
    if not any(python.startswith(tree + os.sep) for tree in _python_trees()):
        return f"the interpreter {python} lies outside {_python_trees()}"
    return None


def _privileged() -> bool:
    return os.geteuid() == 0


def _bwrap_command(workdir: str) -> list[str]:
    if _privileged():
        # As root, a user namespace would map the sandbox to root outside it (the owner of
        # every root-owned file it can see, /proc/sys included). Instead: new mount, PID,
        # network, IPC, UTS and (where possible) cgroup namespaces, every capability dropped
        # but the two the child needs to become `nobody` for real (a host uid owning nothing)
        # before any generated code runs.
        isolation = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                     "--unshare-cgroup-try", "--cap-drop", "ALL",
                     "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        # Unprivileged: the same in a new user namespace (the caller's own uid, no
        # capabilities), with no further user namespaces inside.
        isolation = ["--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
    command = [
        _bwrap() or "bwrap", *isolation, "--hostname", "sandbox",
        # The whole sandbox is SIGKILLed when the parent dies; a new session blocks TIOCSTI.
        "--die-with-parent", "--new-session",
    ]
    for tree in _python_trees():
        # Its parents as plain 0755 directories: bwrap would copy their host modes (a
        # pyenv under /root is 0700), and the sandbox's `nobody` must reach the tree.
        parents = [os.path.dirname(tree)]
        while parents[-1] != "/":
            parents.append(os.path.dirname(parents[-1]))
        for parent in reversed(parents[:-1]):
            command += ["--perms", "0755", "--dir", parent]
        command += ["--ro-bind", tree, tree]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: the usual symlinks into it
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top) and top not in _python_trees():
            command += ["--ro-bind", top, top]
    command += [
        "--ro-bind", os.path.realpath(sandbox_child.__file__), _SANDBOX_RUNNER,
        "--proc", "/proc", "--dev", "/dev",
        "--perms", "01777", "--size", str(_WORKDIR_BYTES), "--tmpfs", workdir,
        # Last: everything but the work dir (and the device nodes themselves) is read-only.
        "--remount-ro", "/", "--remount-ro", "/dev",
        "--chdir", workdir,
    ]
    return command


@dataclass
class _Child:
    """One sandboxed child process and what the parent has read from it so far."""

    proc: subprocess.Popen
    report_fd: int
    max_output_bytes: int
    isolation: str
    host_workdir: str | None
    info_fd: int | None = None  # "os" mode: bwrap's --info-fd (the namespace's init)
    ended_by: str | None = None  # "exit", "timeout", "overflow" or "stopped" (by the parent)
    overflowed: str | None = None  # which stream passed its cap

    def __post_init__(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.names = {self.proc.stdout.fileno(): "stdout", self.proc.stderr.fileno(): "stderr",
                      self.report_fd: "report"}
        self.caps = {"stdout": self.max_output_bytes, "stderr": self.max_output_bytes,
                     "report": _MAX_REPORT_BYTES, "info": _MAX_REPORT_BYTES}
        if self.info_fd is not None:
            self.names[self.info_fd] = "info"
        self.buffers = {name: bytearray() for name in self.caps}
        self.open_fds = set(self.names)
        self.drain_deadline: float | None = None
        self.init_pidfd: int | None = None

    def watch_init(self) -> None:
        """Once bwrap has said which host process is the namespace's init, hold a pidfd on it.

        The kernel lets that init exit only after every other process of the namespace has
        exited, so waiting for it (close) means nothing of the run is left when we return.
        """
        if self.init_pidfd is not None or not hasattr(os, "pidfd_open"):
            return
        try:
            info = json.loads(self.buffers["info"])
            pid, namespace = int(info["child-pid"]), int(info["pid-namespace"])
        except (ValueError, KeyError, TypeError):
            return  # not complete yet
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # already reaped: nothing of the namespace is left
        try:
            same = os.readlink(f"/proc/{pid}/ns/pid") == f"pid:[{namespace}]"
        except OSError:
            same = True  # exited (a zombie has no namespace links): the pidfd is readable
        if same:
            self.init_pidfd = pidfd
        else:
            os.close(pidfd)  # the pid was reused: not ours

    def kill(self, reason: str) -> None:
        if self.drain_deadline is None:
            self.ended_by = reason
            self.drain_deadline = time.monotonic() + _DRAIN_SECONDS
        _kill_group(self.proc.pid)

    def close(self) -> None:
        _kill_group(self.proc.pid)
        self.proc.__exit__(None, None, None)  # closes the pipes, waits for the process
        os.close(self.report_fd)
        if self.info_fd is not None:
            self.watch_init()
            os.close(self.info_fd)
        if self.init_pidfd is not None:
            # bwrap's outer process exits as soon as the command does; the namespace's init
            # is then still killing the rest. --die-with-parent ends it at once anyway.
            for _ in range(2):
                if select.select([self.init_pidfd], [], [], _DRAIN_SECONDS)[0]:
                    break
                try:
                    signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    break
            os.close(self.init_pidfd)
        if self.host_workdir is not None:
            # Leftovers in a private temp dir are not worth failing the run over.
            shutil.rmtree(self.host_workdir, ignore_errors=True)

    def result(self, timeout: float) -> ExecutionResult:
        stdout = self.buffers["stdout"].decode("utf-8", errors="replace")
        stderr = self.buffers["stderr"].decode("utf-8", errors="replace")

        def result(status: str, error: str | None) -> ExecutionResult:
            return ExecutionResult(status=status, stdout=stdout, stderr=stderr, error=error)

        if self.ended_by == "timeout":
            return result("timeout", f"timed out after {timeout} s")
        if self.overflowed == "report":
            return result("error", f"result channel overflow (over {_MAX_REPORT_BYTES} bytes)")
        if self.overflowed:
            return result("error", f"output limit exceeded ({self.overflowed} over "
                                   f"{self.max_output_bytes} bytes)")
        report = _parse_report(bytes(self.buffers["report"]))
        if report is not None and self.ended_by != "stopped":
            return result(report["status"], report["error"])
        returncode = self.proc.returncode
        # bwrap passes a signal death on as exit status 128 + the signal number.
        signum = -returncode if returncode < 0 else (
            returncode - 128 if self.isolation == "os" and 128 < returncode < 128 + 65 else 0)
        if report is None and signum:
            name = _signal_name(signum)
            if signum == signal.SIGXCPU:
                return result("error", f"CPU time limit exceeded (killed by {name})")
            return result("error", f"killed by signal {name}")
        if report is None:
            return result("error", f"sandbox exited with code {returncode} without reporting "
                                   "a result")
        return result("error", "stopped by the sandbox")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _execute(code: str, timeout: float, memory_limit_mb: int, max_output_bytes: int,
             isolation: str, seccomp: bool) -> ExecutionResult:
    child = _spawn(code, {"mode": "run"}, (), timeout, memory_limit_mb, max_output_bytes,
                   isolation, seccomp)
    _supervise([child], timeout)
    return child.result(timeout)


def _spawn(code: str, config: dict[str, Any], fds: tuple[int, ...], timeout: float,
           memory_limit_mb: int, max_output_bytes: int, isolation: str, seccomp: bool
           ) -> _Child:
    """Start one sandboxed child reading `code` from stdin; `fds` are passed to it as well."""
    report_read, report_write = os.pipe()
    info_read = info_write = host_workdir = None
    try:
        if isolation == "os":
            workdir, cwd = _SANDBOX_WORKDIR, "/"
            info_read, info_write = os.pipe()
            fds = (*fds, info_write)
            command = _bwrap_command(workdir) + ["--info-fd", str(info_write), "--",
                                                 _python(), "-I", "-S", "-B", _SANDBOX_RUNNER]
        else:
            host_workdir = workdir = cwd = tempfile.mkdtemp(prefix="nanochat-sandbox-")
            command = [_python(), "-I", "-S", "-B", os.path.realpath(sandbox_child.__file__)]
        config = {**config, "report": report_write, "seccomp": seccomp,
                  "become": _SANDBOX_UID if isolation == "os" and _privileged() else None}
        # An unlinked file as stdin: the code never sits anywhere the child could rewrite it.
        with tempfile.TemporaryFile() as code_file:
            code_file.write(code.encode("utf-8"))
            code_file.seek(0)
            proc = subprocess.Popen(
                command + [json.dumps(config)],
                stdin=code_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=cwd, env=_child_environment(workdir),
                start_new_session=True, pass_fds=(report_write, *fds),
                preexec_fn=_resource_limiter(memory_limit_mb, timeout),
            )
    except BaseException:
        for fd in (report_read, info_read):
            if fd is not None:
                os.close(fd)
        if host_workdir is not None:
            shutil.rmtree(host_workdir, ignore_errors=True)
        raise
    finally:
        # The child has its own copies; ours must go so the pipes read EOF when it exits.
        for fd in (report_write, info_write):
            if fd is not None:
                os.close(fd)
    return _Child(proc, report_read, max_output_bytes, isolation, host_workdir, info_read)


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
        (resource.RLIMIT_FSIZE, _lowered(resource.RLIMIT_FSIZE, sandbox_child.MAX_FILE_BYTES)),
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


def _supervise(children: list[_Child], timeout: float, finisher: _Child | None = None) -> None:
    """Read the children's pipes until they close, the deadline passes, or a stream overflows.

    Reads incrementally and keeps at most the cap per stream, so a flood cannot blow up the
    parent's memory. Once `finisher` is done the others are stopped. Whatever ends the run,
    every child's process group is killed and the child closed before returning.
    """
    deadline = time.monotonic() + timeout
    owner = {fd: child for child in children for fd in child.names}
    try:
        with selectors.DefaultSelector() as selector:
            for fd in owner:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                now = time.monotonic()
                waits = [(child.drain_deadline if child.drain_deadline is not None else deadline)
                         - now for child in children if child.open_fds]
                ready = selector.select(max(0.0, min([_POLL_SECONDS, *waits])))
                readers = set()
                for key, _ in ready:
                    child = owner[key.fd]
                    readers.add(id(child))
                    chunk = os.read(key.fd, _READ_CHUNK_BYTES)
                    if not chunk:
                        selector.unregister(key.fd)
                        child.open_fds.discard(key.fd)
                        continue
                    name = child.names[key.fd]
                    kept = chunk[: child.caps[name] - len(child.buffers[name])]
                    child.buffers[name] += kept
                    if name == "info":
                        child.watch_init()
                    if len(kept) < len(chunk) and child.drain_deadline is None:
                        child.overflowed = child.overflowed or name
                now = time.monotonic()
                for child in children:
                    if not child.open_fds:
                        child.ended_by = child.ended_by or "exit"
                        continue
                    if child.drain_deadline is not None:
                        if now >= child.drain_deadline:  # the drain after the kill is over
                            for fd in list(child.open_fds):
                                selector.unregister(fd)
                            child.open_fds.clear()
                        continue
                    if now >= deadline:
                        child.kill("timeout")
                    elif child.overflowed:
                        child.kill("overflow")
                    elif finisher is not None and child is not finisher and not finisher.open_fds:
                        child.kill("stopped")
                    # The child exited, but something it left behind still holds the pipes.
                    elif id(child) not in readers and _has_exited(child.proc.pid):
                        child.kill("exit")
    finally:
        for child in children:
            child.close()


def _has_exited(pid: int) -> bool:
    # WNOWAIT leaves the child unreaped, so its pid (the process group id) cannot be reused
    # before _kill_group runs.
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group is already gone
        pass


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
