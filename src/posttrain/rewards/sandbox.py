"""Running model-written Python in a sandboxed subprocess.

Layers, each a standard tool (util-linux ``unshare`` / ``setpriv``, POSIX rlimits):

- a new network namespace (no interface but a down loopback: no connection leaves it), a new PID
  namespace with its own ``/proc`` (the program sees no other process, and when it exits or is killed
  every process it started dies with it: no escaped fork-bomb children);
- as root: the program runs as ``nobody`` (cannot read root's files, e.g. ``~/.ssh``, nor write
  outside world-writable places); as another user: a user namespace with an empty tmpfs over ``$HOME``;
- limits: CPU seconds, address space, processes, file size, open files, no core dumps; wall time
  enforced by the parent, which kills the whole namespace;
- a fresh temporary directory as cwd (removed afterwards), an empty environment, ``python -I``
  (no user site-packages, no ``PYTHON*`` variables), bounded stdout / stderr.

If the namespaces cannot be created here, :func:`run_python` refuses (``SandboxUnavailable``) unless
the caller opts in with ``allow_unsandboxed=True``, which keeps the limits but not the isolation.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

NOBODY = 65534


class SandboxUnavailable(RuntimeError):
    pass


@dataclass
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 1024
    processes: int = 32
    file_mb: int = 16
    output_bytes: int = 65536


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _world_executable(path: str) -> bool:
    """Whether ``nobody`` can run ``path``: every directory on the way traversable by others."""
    real = Path(os.path.realpath(path))
    return all(os.stat(p).st_mode & 0o001 for p in [*real.parents, real])


@lru_cache(maxsize=1)
def _python() -> str:
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and (os.geteuid() != 0 or _world_executable(candidate)):
            return candidate
    raise SandboxUnavailable("no Python interpreter the unprivileged sandbox user may run")


@lru_cache(maxsize=1)
def isolation_prefix() -> tuple[str, ...]:
    """The command prefix that isolates a program here, or () if none works."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    if unshare is None:
        return ()
    if os.geteuid() == 0 and setpriv is not None:
        prefix = (unshare, "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
                  setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    else:
        home = os.path.expanduser("~")
        mount = shutil.which("mount") or "/bin/mount"
        prefix = (unshare, "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
                  "/bin/sh", "-c", f'{mount} -t tmpfs none "{home}" && exec "$@"', "sandbox")
    try:
        probe = subprocess.run([*prefix, _python(), "-I", "-c", "pass"], capture_output=True, timeout=30, env={})
    except (OSError, subprocess.TimeoutExpired, SandboxUnavailable):
        return ()
    return prefix if probe.returncode == 0 else ()


def _limit(limits: Limits):
    def apply() -> None:
        mb = 1024 * 1024
        for which, value in ((resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, limits.memory_mb * mb),
                             (resource.RLIMIT_NPROC, limits.processes), (resource.RLIMIT_FSIZE, limits.file_mb * mb),
                             (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(which, (value, value))

    return apply


def run_python(code: str, limits: Limits = Limits(), allow_unsandboxed: bool = False) -> SandboxResult:
    """Run ``code`` as a Python program under the sandbox; never raises for anything the program does."""
    prefix = isolation_prefix()
    if not prefix:
        if not allow_unsandboxed:
            raise SandboxUnavailable(
                "cannot isolate model-written code here (util-linux unshare with network / PID namespaces is needed); "
                "opt in with allow_unsandboxed: true to run it with resource limits only, without isolation")
        warnings.warn("running model-written code WITHOUT network / filesystem isolation (allow_unsandboxed)", stacklevel=2)
    workdir = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    try:
        program = Path(workdir) / "program.py"
        program.write_text(code)
        if os.geteuid() == 0 and prefix:
            os.chown(workdir, NOBODY, NOBODY)
            os.chown(program, NOBODY, NOBODY)
        process = subprocess.Popen([*prefix, _python(), "-I", str(program)], cwd=workdir, env={}, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_limit(limits),
                                   start_new_session=True)
        try:
            out, err = process.communicate(timeout=limits.wall_seconds)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the namespace's init dies, and with it every process inside
            out, err = process.communicate()
            timed_out = True
        cap = limits.output_bytes
        return SandboxResult(None if timed_out else process.returncode, out[:cap].decode(errors="replace"),
                             err[:cap].decode(errors="replace"), timed_out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
