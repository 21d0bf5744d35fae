"""The sandbox for model-written code: hostile programs are contained, scored as failures, and the evaluator goes on."""

from __future__ import annotations

import http.server
import json
import os
import threading
from pathlib import Path

import pytest

from eval.humaneval import check_completion
from eval.sandbox import Limits, run_python
from eval.sources import prepare_files

# No test may depend on the machine's speed (CI shares 2 cores): programs that must finish get a wall clock far
# beyond what they need (a loaded machine once took longer than 2 s to reach a memory limit), and only the tests of
# the timeout itself use a short one.
SHORT = Limits(timeout_s=2.0, memory_bytes=512 << 20)
ROOMY = Limits(timeout_s=60.0, memory_bytes=512 << 20)


def test_a_clean_program_passes_and_sees_only_its_own_directory() -> None:
    r = run_python("import os\nopen('note.txt', 'w').write('ok')\nos.mkdir('d')\nprint(os.listdir('.'))", ROOMY)
    assert r.passed, r.output
    assert "note.txt" in r.output and "program.py" in r.output


def test_an_infinite_loop_is_stopped() -> None:
    r = run_python("while True:\n    pass", SHORT)
    assert r.status == "timeout" and not r.passed
    assert r.seconds < 60  # stopped: a loop that ran on would take forever


def test_a_sleeping_program_is_stopped_by_the_wall_clock() -> None:
    r = run_python("import time\ntime.sleep(600)", SHORT)
    assert r.status == "timeout" and r.seconds < 120


def test_unbounded_allocation_hits_the_memory_limit() -> None:
    r = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))", ROOMY)
    assert not r.passed and "MemoryError" in r.output


def test_network_is_unreachable(tmp_path: Path) -> None:
    """A real server listens on this machine's loopback; the program must not reach it (nor resolve names)."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        for program in (f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/x', timeout=2)",
                        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
                        "import socket\nsocket.getaddrinfo('pypi.org', 443)"):
            r = run_python(program, SHORT)  # a timeout is a failure too
            assert not r.passed, program
        assert hits == []
    finally:
        server.shutdown()


def test_writes_outside_the_directory_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for program in (f"open({str(target)!r}, 'w').write('x')",
                    f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
                    f"import os\nos.remove({str(victim)!r})",
                    f"import os\nos.rename('program.py', {str(target)!r})",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                    "import os\nos.chdir('/tmp')\nopen('escaped.txt', 'w')"):
        r = run_python(program, ROOMY)
        assert not r.passed and "sandbox" in r.output, program
    assert not target.exists()
    assert victim.read_text() == "keep me"


def test_new_processes_and_ctypes_are_refused() -> None:
    for program in ("import os\nos.fork()", "import subprocess\nsubprocess.run(['true'])",
                    "import os\nos.system('true')", "import ctypes\nctypes.CDLL(None)"):
        r = run_python(program, ROOMY)
        assert not r.passed and "sandbox" in r.output, program


def test_the_environment_is_empty() -> None:
    os.environ["CASCADE_SECRET_FOR_TEST"] = "x"
    try:
        r = run_python("import os\nassert 'CASCADE_SECRET_FOR_TEST' not in os.environ", ROOMY)
        assert r.passed, r.output
    finally:
        del os.environ["CASCADE_SECRET_FOR_TEST"]


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    path = prepare_files(["humaneval/HumanEval.jsonl"])["humaneval/HumanEval.jsonl"]
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_humaneval_canonical_solutions_all_pass(problems: list[dict]) -> None:
    assert len(problems) == 164
    failed = [p["task_id"] for p in problems if not check_completion(p, p["canonical_solution"]).passed]
    assert failed == []


def test_humaneval_wrong_or_hostile_completions_fail(problems: list[dict]) -> None:
    p = problems[0]
    for completion in ("    return True\n", "    return None\n", "    import sys; sys.exit(0)\n",
                       "    import os; os._exit(0)\n", "    while True: pass\n", "    x = [0] * 10**10\n",
                       "    open('/tmp/humaneval-escape', 'w')\n"):
        r = check_completion(p, completion, SHORT)  # a timeout is a failure too
        assert not r.passed, completion
    assert not Path("/tmp/humaneval-escape").exists()
    assert check_completion(p, p["canonical_solution"], ROOMY).passed  # and the evaluator still runs programs
