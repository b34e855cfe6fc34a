"""Running model-written Python in a sandboxed subprocess.

Code a model wrote is hostile input. Each program runs under bubblewrap (``bwrap``, the sandbox of Flatpak)
as an unprivileged user, in its own user, PID, mount, network, IPC, UTS and cgroup namespaces:

- **an empty root**: a read-only tmpfs into which only the interpreter, its standard library, the trainer's
  site-packages (read-only, so numpy imports) and the system's shared libraries are bound; ``/proc`` of its own
  PID namespace, a minimal ``/dev``, and two private, size-capped tmpfs: ``/tmp`` (the working directory,
  ``Limits.tmp_mb``) and ``/dev/shm`` (``SHM_MB``). No home directory, run directory, data file, token file or
  host socket exists inside; abstract UNIX sockets and the network end at the network namespace;
- **no privilege**: no capabilities, ``no_new_privs`` (setuid bits do nothing, every bound mount is also
  ``nosuid``), no nested user namespaces; as root the trainer first drops to ``nobody`` (``setpriv``);
- **a seccomp filter** (:func:`seccomp_filter`) refusing what would escape the memory cap or reach the host's
  kernel state: ``memfd_create`` / ``memfd_secret``, SysV shared memory and message queues, POSIX message
  queues, the session keyring (``keyctl``, ``add_key``, ``request_key``), io_uring, userfaultfd, BPF,
  ``perf_event_open``, ``ptrace``; and every call of another ABI (x32, i386);
- **limits**, set inside the sandbox's own user namespace (so ``RLIMIT_NPROC`` counts this program's
  processes only, never a neighbour's): CPU seconds, address space per process, processes, file size, open
  files, no core dumps; the wall time is enforced by the parent, which kills the PID namespace's init: every
  process the program started dies with it, ``setsid`` or not (the kernel ends a PID namespace with its init);
- an environment of three thread-count variables, ``python -I`` (no user site-packages, no ``PYTHON*``
  variables), the program on its stdin, stdout / stderr into files bounded by the file-size limit.

Memory is bounded by ``memory_mb`` of address space per process, ``processes`` processes, and
``tmp_mb + SHM_MB`` of files; shared memory has no other way in. Without bubblewrap and unprivileged user
namespaces, :func:`run_python` refuses (``SandboxUnavailable``) unless the caller opts in with
``allow_unsandboxed=True``, which keeps the limits but not the isolation.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache

NOBODY = 65534
SHM_MB = 8
INSTALL_HINT = "install bubblewrap (Debian / Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)"


class SandboxUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 1024
    processes: int = 32
    file_mb: int = 16
    tmp_mb: int = 64
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


# -- what the program may see --------------------------------------------------------------------------------------
_SYSTEM_LIBRARIES = ("/lib", "/lib32", "/lib64", "/libx32", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libx32")


def _interpreter_paths() -> list[str]:
    """Host paths the interpreter needs: the executable (and the venv it belongs to), the standard library, the
    site-packages, the library directory it was built with."""
    paths = [*_symlink_chain(sys.executable), os.path.dirname(os.__file__)]
    if sys.prefix != sys.base_prefix:
        paths.append(sys.prefix)  # the venv: pyvenv.cfg, bin/python, its site-packages
    paths += [sysconfig.get_path(name) for name in ("purelib", "platlib")]
    paths.append(sysconfig.get_config_var("LIBDIR"))  # libpython, and a conda prefix's libssl, libffi, ...
    return [os.path.abspath(path) for path in paths if path and os.path.exists(path)]


def _symlink_chain(path: str) -> list[str]:
    """``path`` and every path its symlinks lead through (a venv's python -> python3 -> the base interpreter)."""
    chain = [os.path.abspath(path)]
    while os.path.islink(chain[-1]) and len(chain) < 40:
        chain.append(os.path.normpath(os.path.join(os.path.dirname(chain[-1]), os.readlink(chain[-1]))))
    return chain


def _binds() -> tuple[list[tuple[str, str]], list[str]]:
    """(symlink target, link) pairs and the host paths to bind read-only, outermost first, none inside another."""
    links, paths = [], []
    for path in _SYSTEM_LIBRARIES:
        if os.path.islink(path):
            links.append((os.readlink(path), path))  # merged /usr: /lib -> usr/lib
        elif os.path.isdir(path):
            paths.append(path)
    if os.path.exists("/etc/ld.so.cache"):
        paths.append("/etc/ld.so.cache")
    paths += _interpreter_paths()
    unique: list[str] = []
    for path in sorted(set(paths), key=lambda p: (p.count("/"), p)):
        if not any(path == outer or path.startswith(outer.rstrip("/") + "/") for outer in unique):
            unique.append(path)
    return links, unique


# -- seccomp -------------------------------------------------------------------------------------------------------
# syscall numbers: arch/x86/entry/syscalls/syscall_64.tbl and include/uapi/asm-generic/unistd.h (arm64)
_SYSCALLS = {
    "x86_64": {"memfd_create": 319, "memfd_secret": 447, "shmget": 29, "semget": 64, "msgget": 68, "mq_open": 240,
               "keyctl": 250, "add_key": 248, "request_key": 249, "io_uring_setup": 425, "io_uring_enter": 426,
               "io_uring_register": 427, "userfaultfd": 323, "bpf": 321, "perf_event_open": 298, "ptrace": 101,
               "process_vm_readv": 310, "process_vm_writev": 311, "socket": 41},
    "aarch64": {"memfd_create": 279, "memfd_secret": 447, "shmget": 194, "semget": 190, "msgget": 186, "mq_open": 180,
                "keyctl": 219, "add_key": 217, "request_key": 218, "io_uring_setup": 425, "io_uring_enter": 426,
                "io_uring_register": 427, "userfaultfd": 282, "bpf": 280, "perf_event_open": 241, "ptrace": 117,
                "process_vm_readv": 270, "process_vm_writev": 271, "socket": 198},
}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_FOREIGN_ABI = {"x86_64": 0x40000000}  # x32 numbers; i386 calls carry another AUDIT_ARCH
AF_VSOCK = 40  # host <-> guest sockets, which a network namespace does not cover on every kernel
_ALLOW, _KILL, _EPERM = 0x7FFF0000, 0x80000000, 0x00050000 | 1
_LOAD, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K


def seccomp_filter(machine: str | None = None) -> bytes:
    """The classic-BPF program (``struct sock_filter[]``) bwrap loads: EPERM for every call of ``_SYSCALLS`` but
    ``socket``, and for ``socket(AF_VSOCK, ...)``; death for a foreign architecture or ABI; the rest allowed (the
    namespaces and the missing capabilities bound it)."""
    machine = machine or platform.machine()
    if machine not in _SYSCALLS:
        raise SandboxUnavailable(f"no seccomp filter for the {machine} architecture (x86_64 and aarch64 have one)")
    numbers = dict(_SYSCALLS[machine])
    socket = numbers.pop("socket")
    program = [(_LOAD, 0, 0, 4), (_JEQ, 1, 0, _AUDIT_ARCH[machine]), (_RET, 0, 0, _KILL), (_LOAD, 0, 0, 0)]
    if machine in _FOREIGN_ABI:  # seccomp_data: nr at offset 0, arch at 4, args[0] at 16
        program += [(_JGE, 0, 1, _FOREIGN_ABI[machine]), (_RET, 0, 0, _KILL)]
    denied = list(numbers.values())
    for i, number in enumerate(denied):  # to EPERM: past the rest of the list, the socket check and ALLOW
        program.append((_JEQ, len(denied) - i - 1 + 4, 0, number))
    program += [(_JEQ, 0, 2, socket), (_LOAD, 0, 0, 16), (_JEQ, 1, 0, AF_VSOCK), (_RET, 0, 0, _ALLOW),
                (_RET, 0, 0, _EPERM)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


# -- the command ---------------------------------------------------------------------------------------------------
# As root, bwrap runs as nobody, who cannot reach an interpreter under a 0700 home: a private mount namespace first
# binds each path at a place nobody can traverse (STAGE/N, on a tmpfs over an empty directory of ours, in that
# namespace only), then drops to nobody.
_STAGE = r"""
set -e
stage=$1
shift
mount -t tmpfs -o mode=0755,size=1m posttrain-stage "$stage"
i=0
while [ "$1" != "--" ]; do
  i=$((i + 1))
  if [ -d "$1" ]; then mkdir "$stage/$i"; else : > "$stage/$i"; fi
  mount --bind "$1" "$stage/$i"
  shift
done
shift
exec "$@"
"""

# Inside the sandbox: the limits, set in its own user namespace, then the program on stdin.
_LAUNCH = r"""
import os, resource, sys
for name, value in zip(("CPU", "AS", "NPROC", "FSIZE", "NOFILE", "CORE", "MSGQUEUE"), map(int, sys.argv[1:8])):
    resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, value))
os.execve(sys.executable, [sys.executable, "-I", "-"], {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                                                       "MKL_NUM_THREADS": "1"})
"""


def _rlimits(limits: Limits) -> list[str]:
    mb = 1024 * 1024
    return [str(v) for v in (limits.cpu_seconds, limits.memory_mb * mb, limits.processes, limits.file_mb * mb, 64, 0,
                             0)]


def _command(limits: Limits, seccomp_fd: int, info_fd: int, stage: str) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"bubblewrap is not installed: {INSTALL_HINT}")
    links, paths = _binds()
    as_root = os.geteuid() == 0
    sources = [f"{stage}/{i + 1}" for i in range(len(paths))] if as_root else paths
    command = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--as-pid-1",
               "--new-session", "--cap-drop", "ALL", "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname",
               "sandbox", "--seccomp", str(seccomp_fd), "--info-fd", str(info_fd),
               "--proc", "/proc", "--dev", "/dev", "--size", str(SHM_MB << 20), "--tmpfs", "/dev/shm",
               "--remount-ro", "/dev", "--size", str(limits.tmp_mb << 20), "--tmpfs", "/tmp"]
    for source, path in zip(sources, paths):  # after /tmp: an interpreter under /tmp stays visible
        command += ["--ro-bind", source, path]
    for target, link in links:
        command += ["--symlink", target, link]
    command += ["--chdir", "/tmp", "--remount-ro", "/", "--", os.path.abspath(sys.executable), "-I", "-S", "-c",
                _LAUNCH, *_rlimits(limits)]
    if not as_root:
        return command
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    if unshare is None or setpriv is None:
        raise SandboxUnavailable("as root the sandbox needs util-linux's unshare and setpriv to drop to nobody")
    drop = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all"]
    return [unshare, "--mount", "--propagation", "private", "/bin/sh", "-c", _STAGE, "stage", stage, *paths, "--",
            *drop, *command]


def _spawn(code: bytes, limits: Limits, stdout, stderr) -> tuple[int | None, bool]:
    """Run one sandboxed program to its end or its wall time; (exit code, timed out)."""
    seccomp_read, seccomp_write = os.pipe()
    info_read, info_write = os.pipe()
    stage = tempfile.mkdtemp(prefix="posttrain-stage-") if os.geteuid() == 0 else ""  # stays empty out here
    try:
        if stage:
            os.chmod(stage, 0o755)
        os.write(seccomp_write, seccomp_filter())
        os.close(seccomp_write)
        process = subprocess.Popen(_command(limits, seccomp_read, info_write, stage), env={}, stdin=subprocess.PIPE,
                                   stdout=stdout, stderr=stderr, pass_fds=(seccomp_read, info_write),
                                   start_new_session=True)
        os.close(info_write)
        info_write = -1
        return _wait(process, code, limits.wall_seconds, lambda: _kill(process, info_read))
    finally:
        for fd in (seccomp_read, info_read, info_write):
            if fd >= 0:
                os.close(fd)
        if stage:
            os.rmdir(stage)


def _wait(process: subprocess.Popen, code: bytes, seconds: float, kill) -> tuple[int | None, bool]:
    """Feed the program its code and wait for it, or ``kill`` it at its wall time; (exit code, timed out)."""
    try:
        process.communicate(code, timeout=seconds)
        return process.returncode, False
    except subprocess.TimeoutExpired:
        kill()
        return None, True
    except BrokenPipeError:  # the program died before reading all of itself
        process.wait()
        return process.returncode, False


def _kill(process: subprocess.Popen, info_read: int) -> None:
    """End the PID namespace through its init (the kernel then kills every process in it, and bwrap, its parent,
    reaps it and exits); bwrap's whole process group only if that does not end it."""
    os.set_blocking(info_read, False)
    try:
        child = json.loads(os.read(info_read, 4096) or b"{}").get("child-pid")
    except (BlockingIOError, ValueError):
        child = None
    if child is not None:
        try:
            os.kill(child, signal.SIGKILL)
            process.wait(timeout=5)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    os.killpg(process.pid, signal.SIGKILL)  # bwrap's death kills the namespace's init too (--die-with-parent)
    process.wait()


@lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why programs cannot be isolated here, or None where they can (a probe program is run once)."""
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            returncode, _ = _spawn(b"open('probe', 'w').write('1')", Limits(wall_seconds=30), out, err)
            err.seek(0)
            message = err.read(2000).decode(errors="replace").strip()
    except (OSError, SandboxUnavailable) as exc:
        return str(exc)
    if returncode != 0:
        return f"bubblewrap could not start a sandbox here ({message or f'exit code {returncode}'})"
    return None


def require_isolation(what: str, opt_in: str) -> None:
    """Refuse before training, not at the first program, where the sandbox cannot isolate code."""
    reason = unavailable_reason()
    if reason is not None:
        raise SandboxUnavailable(f"{what} runs model-written code, and this machine cannot isolate it: {reason}. "
                                 f"{INSTALL_HINT.capitalize()} (it needs unprivileged user namespaces), or set "
                                 f"{opt_in} to run it with resource limits only, without isolation")


def run_python(code: str, limits: Limits = Limits(), allow_unsandboxed: bool = False) -> SandboxResult:
    """Run ``code`` as a Python program under the sandbox; never raises for anything the program does."""
    reason = unavailable_reason()
    if reason is not None and not allow_unsandboxed:
        raise SandboxUnavailable(f"cannot isolate model-written code here: {reason}; {INSTALL_HINT}, or opt in with "
                                 "allow_unsandboxed: true to run it with resource limits only, without isolation")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # RLIMIT_FSIZE bounds them
        if reason is None:
            returncode, timed_out = _spawn(code.encode(), limits, out, err)
        else:
            warnings.warn("running model-written code WITHOUT isolation (allow_unsandboxed)", stacklevel=2)
            returncode, timed_out = _unsandboxed(code.encode(), limits, out, err)
        return SandboxResult(returncode, _head(out, limits.output_bytes), _head(err, limits.output_bytes), timed_out)


def _unsandboxed(code: bytes, limits: Limits, stdout, stderr) -> tuple[int | None, bool]:
    """The opt-in fallback: the same launcher and limits (the process count on top of what this user runs, since
    there is no user namespace of its own to count in), no isolation."""
    rlimits = _rlimits(limits)
    rlimits[2] = str(limits.processes + _tasks_of(os.getuid()))
    work = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    try:
        process = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCH, *rlimits], cwd=work, env={},
                                   stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, start_new_session=True)
        return _wait(process, code, limits.wall_seconds,
                     lambda: (os.killpg(process.pid, signal.SIGKILL), process.wait()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


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


def _head(file, limit: int) -> str:
    file.seek(0)
    return file.read(limit).decode(errors="replace")
