"""Run model-written Python in a contained child process, never in the evaluator's own.

Each program gets: a fresh process (`python -I -S`, empty environment), a throwaway working directory that is
deleted afterwards, CPU-time, address-space, file-size and open-file limits, a wall-clock timeout that kills its
whole process group, no network (its own empty network namespace via `unshare` where the kernel allows, and always
an audit hook that refuses sockets), and an audit hook that refuses writes outside its directory, new processes,
ctypes and signals. Audit hooks cannot be removed from Python code, so the program runs after the hook is set.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timeout", "error"]

# Runs first in the child: the audit hook, then the program. Kept self-contained (no imports from cascade).
PRELUDE = r'''
import os, sys
ROOT = os.path.realpath(os.getcwd())
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.replace": 2, "os.link": 2,
               "os.symlink": 2, "os.chmod": 1, "os.chown": 1, "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1,
               "os.chdir": 1, "os.chroot": 1}
DENIED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
          "os.kill", "os.killpg", "signal.", "ctypes.", "pty.", "winreg.", "webbrowser.", "sys._current_frames")

def _inside(path):
    if isinstance(path, int):
        return True
    path = os.path.realpath(os.fsdecode(path))
    return path == ROOT or path.startswith(ROOT + os.sep)

def _guard(event, args):
    if event == "open":
        path, mode, flags = args
        writes = bool(mode and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        if writes and not _inside(path):
            raise PermissionError(f"sandbox: no writes outside the working directory ({path})")
    elif event in PATH_EVENTS:
        for path in args[:PATH_EVENTS[event]]:
            if path is not None and not _inside(path):
                raise PermissionError(f"sandbox: {event} outside the working directory ({path})")
    elif event.startswith(DENIED):
        raise PermissionError(f"sandbox: {event} is not allowed")

sys.addaudithook(_guard)
with open("program.py", encoding="utf-8") as f:
    source = f.read()
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock; CPU time is limited to the same
    memory_bytes: int = 1 << 30  # address space
    file_bytes: int = 16 << 20  # largest file the program may write (its output goes to a file too)
    open_files: int = 64


@dataclass(frozen=True)
class SandboxResult:
    status: Status
    returncode: int | None
    output: str  # the last few KB of stdout+stderr
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def network_isolation() -> list[str]:
    """`unshare` arguments that give the child an empty network namespace, or [] where the kernel refuses."""
    unshare = shutil.which("unshare")
    if unshare is None:
        log.warning("sandbox: `unshare` not found; network is blocked by the audit hook only")
        return []
    for args in ([unshare, "--net", "--map-root-user"], [unshare, "--net"]):
        if subprocess.run([*args, "true"], capture_output=True).returncode == 0:
            return args
    log.warning("sandbox: network namespaces unavailable; network is blocked by the audit hook only")
    return []


def _limit(limits: Limits) -> None:
    """In the child between fork and exec."""
    cpu = max(1, int(limits.timeout_s) + 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(program: str, limits: Limits | None = None) -> SandboxResult:
    """Run `program`; "passed" means it exited 0 within the limits."""
    limits = limits or Limits()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cascade-sandbox-") as tmp:
        workdir = Path(tmp) / "work"
        workdir.mkdir()
        (workdir / "program.py").write_text(program, encoding="utf-8")
        out_path = Path(tmp) / "output.txt"  # outside workdir: the program cannot tamper with it by name
        cmd = [*network_isolation(), sys.executable, "-I", "-S", "-c", PRELUDE]
        with out_path.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=workdir, env={"PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=lambda: _limit(limits))
            try:
                code: int | None = proc.wait(timeout=limits.timeout_s)
                status: Status = "passed" if code == 0 else "failed"
            except subprocess.TimeoutExpired:
                code, status = None, "timeout"
            finally:
                _kill_group(proc)
        output = out_path.read_bytes()[-4096:].decode("utf-8", errors="replace")
    if code is not None and code < 0:
        status = "timeout" if -code in (signal.SIGXCPU, signal.SIGKILL) else "error"
    return SandboxResult(status, code, output, time.monotonic() - start)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """The program may not fork (audit hook), but kill its whole session anyway."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
