"""The code sandbox against hostile programs (tests/sandbox_attacks.py), as this user and, when the tests run as
root, as an unprivileged user too; the seccomp filter's shape; the refusal without isolation."""

import json
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

import sandbox_attacks
import posttrain.core.sandbox as sandbox
from posttrain.core.sandbox import Limits, SandboxUnavailable, run_python, seccomp_filter

TESTS = Path(__file__).resolve().parent
UNPRIVILEGED = 4242  # a uid nobody on this machine uses: no passwd entry is needed
# skipped only where bubblewrap is missing: where it is installed but cannot isolate, the tests fail
needs_isolation = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


def assert_held(outcome: dict) -> None:
    name = outcome["attack"]
    assert outcome["score"] == 0.0, f"{name}: the program succeeded"
    assert not outcome["escaped"] and not outcome["leaked_secret"], f"{name}: got through ({outcome['stderr']})"
    assert outcome["left_running"] == [], f"{name}: processes left running"
    assert outcome["bashrc_intact"] and outcome["site_intact"], f"{name}: a host file changed"


@pytest.fixture(scope="module")
def bait():
    with sandbox_attacks.host_bait(TESTS) as bait:
        yield bait


@needs_isolation
@pytest.mark.parametrize("attack", sandbox_attacks.ATTACKS)
def test_a_hostile_program_scores_zero_and_leaves_nothing(attack, bait):
    assert_held(sandbox_attacks.run_attack(attack, bait))


@needs_isolation
def test_a_program_at_its_process_cap_does_not_starve_a_neighbour():
    outcome = sandbox_attacks.neighbours()
    assert outcome["hog"].startswith("capped after"), outcome  # the hog did reach its cap
    assert {k: outcome[k] for k in ("ok", "stdout", "stderr")} == {"ok": True, "stdout": "ok\n", "stderr": ""}


@needs_isolation
def test_numpy_imports_inside():
    pytest.importorskip("numpy")
    assert sandbox_attacks.numpy_inside()["stdout"] == "6\n"


@needs_isolation
def test_output_is_bounded_and_the_environment_holds_only_thread_counts():
    result = run_python("import os\nprint(sorted(os.environ))\nprint('y' * 100000)", Limits(output_bytes=1000))
    assert result.ok and len(result.stdout) == 1000
    names = set(eval(result.stdout.splitlines()[0]))
    assert names <= {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "LC_CTYPE"}


@needs_isolation
@pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged user needs root")
@pytest.mark.skipif(not os.path.exists("/usr/bin/python3") or not shutil.which("setpriv"),
                    reason="needs the system's /usr/bin/python3 and setpriv")
def test_every_attack_holds_for_an_unprivileged_trainer():
    """The same attacks with the trainer running as an ordinary user (the sandbox is then root of nothing: its
    user namespace maps one uid), with the system's Python, whose directories that user can read."""
    home = Path(tempfile.mkdtemp(prefix="posttrain-unprivileged-", dir="/var/tmp"))
    try:
        os.chown(home, UNPRIVILEGED, UNPRIVILEGED)
        home.chmod(0o700)
        command = [shutil.which("setpriv"), f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}", "--clear-groups",
                   "/usr/bin/python3", "-I", str(TESTS / "sandbox_attacks.py")]
        done = subprocess.run(command, env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, cwd=home,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert lines[0] == {"uid": UNPRIVILEGED, "reason": None}
        outcomes = [line for line in lines if "attack" in line]
        assert [o["attack"] for o in outcomes] == list(sandbox_attacks.ATTACKS)
        for outcome in outcomes:
            assert_held(outcome)
        assert lines[-1]["neighbours"]["ok"] and lines[-1]["neighbours"]["hog"].startswith("capped"), lines[-1]
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_the_seccomp_filter_is_one_program_per_architecture():
    for machine in ("x86_64", "aarch64"):
        program = seccomp_filter(machine)
        instructions = [struct.unpack("=HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
        assert instructions[0] == (0x20, 0, 0, 4)  # load seccomp_data.arch first
        assert instructions[-2:] == [(0x06, 0, 0, 0x7FFF0000), (0x06, 0, 0, 0x00050001)]  # allow, else EPERM
        denials = [(offset, k) for offset, (code, _, _,
                                            k) in enumerate(instructions[:-5]) if code == 0x15 and offset > 1]
        assert [k for _, k in denials] == [n for name, n in sandbox._SYSCALLS[machine].items() if name != "socket"]
        for offset, _ in denials:  # each lands on the EPERM return
            assert offset + 1 + instructions[offset][1] == len(instructions) - 1
        assert instructions[-5:-2] == [(0x15, 0, 2, sandbox._SYSCALLS[machine]["socket"]), (0x20, 0, 0, 16),
                                       (0x15, 1, 0, 40)]  # socket(AF_VSOCK, ...) refused, other families allowed
    with pytest.raises(SandboxUnavailable, match="riscv64"):
        seccomp_filter("riscv64")


def test_without_isolation_code_is_refused_unless_opted_in(monkeypatch):
    from posttrain.core.errors import UserError
    from posttrain.rewards import code_tests
    from posttrain.rewards.runner import RewardRunner

    monkeypatch.setattr(sandbox, "unavailable_reason", lambda: "bubblewrap is not installed")
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        run_python("print(1)")
    with pytest.raises(UserError, match="allow_unsandboxed"):
        RewardRunner([("code_tests", 1.0, {})])
    with pytest.warns(UserWarning, match="WITHOUT"):
        assert code_tests(None, ["x = 1"], [["assert x == 1"]], allow_unsandboxed=True) == [1.0]
    with pytest.warns(UserWarning):  # the limits still hold without isolation
        assert code_tests(None, ["while True: pass"], [["pass"]], wall_seconds=2, cpu_seconds=1,
                          allow_unsandboxed=True) == [0.0]
