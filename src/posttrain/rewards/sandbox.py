"""Running model-written Python in a sandboxed subprocess.

Layers, each a standard tool (util-linux ``unshare`` / ``setpriv``, POSIX rlimits):

- a new network namespace (no interface but a down loopback: no connection leaves it), a new PID
  namespace with its own ``/proc`` (the program sees no other process, and when it exits or is killed
  every process it started dies with it: no escaped fork-bomb children);
- a new mount namespace in which every mount is read-only and fresh, private, size-bounded tmpfs cover
  ``/tmp`` (the working directory), ``/var/tmp``, ``/dev/shm``, ``/run/lock`` and ``$HOME``: the program
  writes nowhere that outlives it, and sees no home directory (``~/.ssh``);
- as root: the program runs as ``nobody`` (cannot read root's files); as another user: a user namespace;
- limits: CPU seconds, address space, processes, file size, open files, no core dumps; wall time
  enforced by the parent, which kills the whole namespace;
- an empty environment, ``python -I`` (no user site-packages, no ``PYTHON*`` variables), the program on
  its stdin, stdout / stderr into files bounded by the file-size limit.

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


# Run inside the new namespaces, as their root, before the program: every mount read-only, fresh private tmpfs
# over the world-writable places and the home directory, /tmp as the working directory; then the program.
_PRELUDE = r"""
for m in $(awk '{print $2}' /proc/self/mounts | sort -u); do
  case "$m" in /dev|/dev/pts|/proc|/proc/*|/sys|/sys/*) ;; *) mount -o remount,bind,ro "$m" 2>/dev/null ;; esac
done
for d in /tmp /var/tmp /dev/shm /run/lock "$SANDBOX_HOME"; do
  [ -d "$d" ] && mount -t tmpfs -o size=64m,mode=1777 sandbox "$d" || true
done
cd /tmp && exec /usr/bin/env -i "$@"
"""


@lru_cache(maxsize=1)
def isolation_prefix() -> tuple[str, ...]:
    """The command prefix that isolates a program here, or () if none works."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    if unshare is None:
        return ()
    home = os.path.expanduser("~")
    namespaces = ("--net", "--pid", "--fork", "--kill-child", "--mount-proc")
    prelude = ("/usr/bin/env", f"SANDBOX_HOME={home}", "/bin/sh", "-c", _PRELUDE, "sandbox")
    if os.geteuid() == 0 and setpriv is not None:
        prefix = (unshare, *namespaces, *prelude, setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    else:
        prefix = (unshare, "--user", "--map-root-user", *namespaces, *prelude)
    try:
        probe = subprocess.run([*prefix, _python(), "-I", "-c", "import os; open('/tmp/probe', 'w')"],
                               capture_output=True, timeout=30, env={})
    except (OSError, subprocess.TimeoutExpired, SandboxUnavailable):
        return ()
    return prefix if probe.returncode == 0 else ()


def _tasks_of(uid: int) -> int:
    """Processes and threads that ``uid`` runs now: RLIMIT_NPROC counts them all, the trainer's included."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return count


def _limit(limits: Limits):
    # as root the program runs as nobody, who runs nothing else; otherwise the limit is on top of what we run
    processes = limits.processes + (0 if os.geteuid() == 0 else _tasks_of(os.getuid()))

    def apply() -> None:
        mb = 1024 * 1024
        for which, value in ((resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, limits.memory_mb * mb),
                             (resource.RLIMIT_NPROC, processes), (resource.RLIMIT_FSIZE, limits.file_mb * mb),
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
    cwd = None if prefix else tempfile.mkdtemp(prefix="posttrain-sandbox-")  # isolated: a private tmpfs
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # RLIMIT_FSIZE bounds them
            process = subprocess.Popen([*prefix, _python(), "-I", "-"], cwd=cwd, env={}, stdin=subprocess.PIPE,
                                       stdout=out, stderr=err, preexec_fn=_limit(limits), start_new_session=True)
            timed_out = False
            try:
                process.communicate(code.encode(), timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the namespace's init dies, and every process inside with it
                process.wait()
                timed_out = True
            except BrokenPipeError:  # the program died before reading all of itself
                process.wait()
            return SandboxResult(None if timed_out else process.returncode, _head(out, limits.output_bytes),
                                 _head(err, limits.output_bytes), timed_out)
    finally:
        if cwd is not None:
            shutil.rmtree(cwd, ignore_errors=True)


def _head(file, limit: int) -> str:
    file.seek(0)
    return file.read(limit).decode(errors="replace")
