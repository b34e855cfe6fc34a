"""Hostile programs against the code sandbox, and the host-side checks that they changed nothing.

Standard library only, and the sandbox module is loaded from its file, so that ``tests/test_sandbox.py`` can run
this file as an unprivileged user with the system's Python (``python sandbox_attacks.py``: one JSON line per
attack). Each program prints ``ESCAPED`` if it got through and otherwise fails (a non-zero exit or its wall time):
it must score 0, print no secret, change no host file and leave nothing running (SysV IPC objects die with the
sandbox's IPC namespace; the filter refuses creating them anyway).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import platform
import socket
import string
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

SECRET = "hunter2-posttrain-probe"
_SOURCE = Path(__file__).resolve().parents[1] / "src" / "posttrain" / "core" / "sandbox.py"


def load_sandbox():
    """posttrain.core.sandbox without importing the package (which needs torch)."""
    if "posttrain.core.sandbox" in sys.modules:
        return sys.modules["posttrain.core.sandbox"]
    spec = importlib.util.spec_from_file_location("posttrain_sandbox_probe", _SOURCE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
_FILL = ("for i in range(14):\n    with open(f'{directory}/fill{{i}}', 'wb') as f:\n        for _ in range(15):\n"
         "            f.write(b'x' * (1 << 20))\n            f.flush()\nprint('ESCAPED')")  # files under RLIMIT_FSIZE
_FAIL = "if {call} != 0:\n    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))\n"

# name -> program (string.Template: $home, $secret_dir, $socket, $abstract, $site, $parent, $keyctl)
ATTACKS = {
    # item 10: a session of its own escapes a process-group kill; a PID namespace's end does not
    "setsid daemon, program exits": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                                    "        time.sleep(30)\n    os._exit(0)\nraise SystemExit(1)",
    "setsid daemon, program hangs": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n"
                                    "time.sleep(30)",
    # item 11: root of its own user namespace with every capability
    "remount / read-write": _LIBC + _FAIL.format(call="libc.mount(None, b'/', None, 32 | 4096, None)")
                            + "open('/pwned', 'w')\nprint('ESCAPED')",
    "unmount the private /tmp": _LIBC + _FAIL.format(call="libc.umount2(b'/tmp', 2)") + "print('ESCAPED')",
    "read ~/.ssh": "print(open('$home/.ssh/id_rsa').read())\nprint('ESCAPED')",
    "append to ~/.bashrc": "open('$home/.bashrc', 'a').write('echo pwned')\nprint('ESCAPED')",
    "write into site-packages": "open('$site/pwned.pth', 'w').write('import os')\nprint('ESCAPED')",
    # item 12: world-readable run directory, data, tokens; the session keyring
    "read the run's recipe": "print(open('$secret_dir/run/recipe.yaml').read())\nprint('ESCAPED')",
    "read the training data": "print(open('$secret_dir/train.jsonl').read())\nprint('ESCAPED')",
    "read an HF token": "print(open('$home/.cache/huggingface/token').read())\nprint('ESCAPED')",
    "list the host's files": "import os\nprint(os.listdir('$secret_dir'))\nprint('ESCAPED')",
    "read the session keyring": _LIBC + "buf = ctypes.create_string_buffer(4096)\n"
                                "n = libc.syscall($keyctl, 11, -3, buf, 4096)\n"
                                "if n < 0:\n    raise OSError(ctypes.get_errno(), 'keyctl')\nprint(buf.raw[:n])\n"
                                "print('ESCAPED')",
    "see the trainer's processes": "import os\nmine = [p for p in os.listdir('/proc') if p.isdigit()]\n"
                                   "if len(mine) <= 3:\n    raise SystemExit('alone')\nprint(mine)\nprint('ESCAPED')",
    # item 13: host UNIX sockets
    "connect to a 0666 UNIX socket": "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('$socket')\n"
                                     "print(s.recv(100))\nprint('ESCAPED')",
    "connect to an abstract socket": "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0$abstract')\n"
                                     "print(s.recv(100))\nprint('ESCAPED')",
    "connect to the D-Bus system bus": "import socket\ns = socket.socket(socket.AF_UNIX)\n"
                                       "s.connect('/run/dbus/system_bus_socket')\nprint('ESCAPED')",
    "a vsock socket to the host": "import socket\ns = socket.socket(40, socket.SOCK_STREAM)\n"
                                  "s.connect((2, 5002))\nprint('ESCAPED')",
    "connect to the network": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\nprint('ESCAPED')",
    # item 14: memory outside the address-space limit
    "256 MB of SysV shared memory": _LIBC + "libc.shmat.restype = ctypes.c_void_p\n"
                                    "shm = libc.shmget(0, 256 << 20, 0o1600)\n"
                                    "if shm < 0:\n    raise OSError(ctypes.get_errno(), 'shmget')\n"
                                    "address = libc.shmat(shm, None, 0)\nctypes.memset(address, 1, 256 << 20)\n"
                                    "libc.shmdt(ctypes.c_void_p(address))\nprint('ESCAPED')",
    "1 GB of SysV semaphores": _LIBC + "for _ in range(4000):\n    if libc.semget(0, 32000, 0o1600) < 0:\n"
                               "        raise OSError(ctypes.get_errno(), 'semget')\nprint('ESCAPED')",
    "600 MB of memfd": "import os\nfds = [os.memfd_create(f'x{i}') for i in range(40)]\nfor fd in fds:\n"
                       "    for _ in range(15):\n        os.write(fd, b'x' * (1 << 20))\nprint('ESCAPED')",
    "200 MB into /tmp": _FILL.format(directory="/tmp"),
    "200 MB into /dev/shm": _FILL.format(directory="/dev/shm"),
    "a file in /dev": "open('/dev/fill', 'w').write('x')\nprint('ESCAPED')",
    "10 GB allocation": "block = bytearray(10 * 1024 ** 3)\nprint('ESCAPED')",
    # item 16: privileges
    "a nested user namespace": _LIBC + _FAIL.format(call="libc.unshare(0x10000000)") + "print('ESCAPED')",
    "setuid has an effect": "import os\nstatus = open('/proc/self/status').read()\n"
                            "mounts = [line.split()[3].split(',') for line in open('/proc/self/mounts')]\n"
                            "if 'NoNewPrivs:\\t1' in status and all('nosuid' in m for m in mounts):\n"
                            "    raise SystemExit('held')\nprint('ESCAPED')",
    "a capability": "import os\ncaps = [l for l in open('/proc/self/status') if l.startswith('CapEff')][0]\n"
                    "if int(caps.split()[1], 16) == 0:\n    raise SystemExit('held')\nprint('ESCAPED')",
    # the classics
    "fork bomb": "import os\nwhile True:\n    os.fork()",
    "infinite loop": "while True:\n    pass",
    "kill the parent": "import os, signal\nos.kill($parent, signal.SIGKILL)\nprint('ESCAPED')",
    "kill every process": "import os, signal, time\nos.kill(-1, signal.SIGKILL)\ntime.sleep(1)\nprint('ESCAPED')",
    "output flood": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
}
LIMITS = dict(wall_seconds=3.0, cpu_seconds=2, memory_mb=256, processes=16, tmp_mb=64)


@contextmanager
def host_bait(parent: Path):
    """Secrets a hostile program must not reach, in a world-readable directory under ``parent``: run files, a home
    directory with keys and tokens, a 0666 UNIX socket and an abstract one; a key in this session's keyring."""
    base = Path(tempfile.mkdtemp(prefix=".sandbox-probe-", dir=parent))
    home = base / "home"
    servers = []
    try:
        base.chmod(0o755)
        for path in (base / "run" / "recipe.yaml", base / "train.jsonl", home / ".ssh" / "id_rsa",
                     home / ".cache" / "huggingface" / "token"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"api_key: {SECRET}\n")
            path.chmod(0o644)
        (home / ".bashrc").write_text("# bashrc\n")
        (home / ".ssh" / "id_rsa").chmod(0o600)
        home.chmod(0o700)
        for address in (str(base / "sock"), f"\0posttrain-probe-{os.getpid()}"):
            server = socket.socket(socket.AF_UNIX)
            server.bind(address)
            if not address.startswith("\0"):
                os.chmod(address, 0o666)
            server.listen(8)
            servers.append(server)
            threading.Thread(target=_serve, args=(server,), daemon=True).start()
        _add_key(SECRET)
        site = next(p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p))
        yield {"home": str(home), "secret_dir": str(base), "socket": str(base / "sock"),
               "abstract": f"posttrain-probe-{os.getpid()}", "site": site, "parent": os.getpid(),
               "keyctl": _keyctl_number()}
    finally:
        for server in servers:
            server.close()
        for path in sorted(base.rglob("*"), key=lambda p: -len(p.parts)):
            path.unlink() if not path.is_dir() or path.is_symlink() else path.rmdir()
        base.rmdir()


def _serve(server: socket.socket) -> None:
    try:
        while True:
            connection, _ = server.accept()
            connection.sendall(SECRET.encode())
            connection.close()
    except OSError:
        return


def _keyctl_number() -> int:
    return {"x86_64": 250, "aarch64": 219}.get(platform.machine(), -1)


def _add_key(payload: str) -> None:
    """A user key in this session's keyring, for the keyring attack to look for (if this kernel lets us)."""
    number = {"x86_64": 248, "aarch64": 217}.get(platform.machine())
    if number is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(number, b"user", b"posttrain-probe", payload.encode(), len(payload), -3)


def foreign_processes() -> set[int]:
    """Live processes of the sandbox's users (nobody, or this user) in PID namespaces other than this process's:
    sandboxes still running."""
    own, users = os.readlink("/proc/self/ns/pid"), {65534, os.getuid()}
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
                uid = int(status.split("\nUid:")[1].split()[0])
                zombie = "\nState:\tZ" in status
                if uid in users and not zombie and os.readlink(f"/proc/{entry}/ns/pid") != own:
                    found.add(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def run_attack(name: str, bait: dict, sandbox=None) -> dict:
    """One attack: its score under the sandbox (0 or 1) and what it left behind."""
    sandbox = sandbox or load_sandbox()
    before = foreign_processes()
    code = string.Template(ATTACKS[name]).substitute(bait)
    start = time.perf_counter()
    result = sandbox.run_python(code + "\n", sandbox.Limits(**LIMITS))
    seconds = time.perf_counter() - start
    time.sleep(0.05)
    return {"attack": name, "score": float(result.ok), "seconds": round(seconds, 3),
            "escaped": "ESCAPED" in result.stdout, "leaked_secret": SECRET in result.stdout + result.stderr,
            "left_running": sorted(foreign_processes() - before),
            "bashrc_intact": Path(bait["home"], ".bashrc").read_text() == "# bashrc\n",
            "site_intact": not Path(bait["site"], "pwned.pth").exists(), "stderr": result.stderr[-300:]}


def neighbours(sandbox=None) -> dict:
    """Item 15: a program holding its whole process allowance must not make a concurrent correct one fail."""
    sandbox = sandbox or load_sandbox()
    hog = ("import os, time\nforks = 0\nwhile forks < 200:\n    try:\n        if os.fork() == 0:\n"
           "            time.sleep(6)\n            os._exit(0)\n        forks += 1\n    except OSError:\n"
           "        print('capped after', forks)\n        break\ntime.sleep(6)\n")
    correct = ("import threading\nthreads = [threading.Thread(target=sum, args=([1],)) for _ in range(8)]\n"
               "for t in threads:\n    t.start()\nfor t in threads:\n    t.join()\nprint('ok')\n")
    limits = sandbox.Limits(wall_seconds=8, cpu_seconds=4, memory_mb=256, processes=16)
    hogged = []
    hog_thread = threading.Thread(target=lambda: hogged.append(sandbox.run_python(hog, limits)))
    hog_thread.start()
    time.sleep(2.0)  # the hog has used up its processes (it says so when it ends)
    result = sandbox.run_python(correct, limits)
    hog_thread.join()
    return {"ok": result.ok, "stdout": result.stdout, "stderr": result.stderr[-300:],
            "hog": hogged[0].stdout.strip() if hogged else ""}


def numpy_inside(sandbox=None) -> dict:
    sandbox = sandbox or load_sandbox()
    result = sandbox.run_python("import numpy\nprint(int(numpy.arange(4).sum()))\n")
    return {"ok": result.ok, "stdout": result.stdout, "stderr": result.stderr[-300:]}


def main() -> None:
    sandbox = load_sandbox()
    print(json.dumps({"uid": os.getuid(), "reason": sandbox.unavailable_reason()}), flush=True)
    with host_bait(Path.home()) as bait:
        for name in ATTACKS:
            print(json.dumps(run_attack(name, bait, sandbox)), flush=True)
    print(json.dumps({"neighbours": neighbours(sandbox)}), flush=True)


if __name__ == "__main__":
    main()
