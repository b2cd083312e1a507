"""``stages tour``: the whole progression, run as the README runs it, must show what the kernel did.

The tour runs as a subprocess of the command line (``python -m stages.cli tour``), with its state
(``STAGES_HOME``: the embedded rootfs) and its temporary files (``TMPDIR``: the canaries) in directories
of the test, so the test can see that it left nothing behind; the leak fixture checks mounts, network
namespaces, veths, cgroups and processes.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess

import pytest

from stages import tour

pytestmark = pytest.mark.root


def run_tour(python: str, tmp_path, *arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
    home, temporary = tmp_path / "home", tmp_path / "tmp"
    temporary.mkdir(exist_ok=True)
    environment = {**os.environ, "STAGES_HOME": str(home), "TMPDIR": str(temporary)}
    result = subprocess.run([python, "-m", "stages.cli", "tour", *arguments], capture_output=True, text=True,
                            env=environment, timeout=timeout, stdin=subprocess.DEVNULL)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    # Every canary and temporary directory the tour made is gone.
    assert os.listdir(temporary) == [], os.listdir(temporary)
    return result


def lines_about(output: str, subject: str) -> str:
    """The lines of one finding: its first line starts with the subject, the rest are indented under."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(subject))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith(" " * 6) or line.strip().startswith(("[", "--")):
            break
        block.append(line)
    return " ".join(" ".join(block).split())  # wrapped lines joined again


def test_stage_1_shows_what_chroot_hides_and_the_escape(python, tmp_path):
    result = run_tour(python, tmp_path, "--stage", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "== stage 1: the chroot jail ==" in out
    assert "stage 2" not in out
    # Files are hidden: the jail could not cat the host's canary by name.
    files = lines_about(out, "files")
    assert "[isolated]" in files and "No such file" in files
    # The hostname is the host's, seen from inside.
    hostname = lines_about(out, "hostname")
    assert "[SHARED]" in hostname and f"jail: {socket.gethostname()}" in hostname
    # The escape read the canary made for it, whose random token only the tour knew.
    canary_line = lines_about(out, "canary")
    token = canary_line.split("holding ")[1].split()[0]
    assert token.startswith("stages-canary-")
    escape = lines_about(out, "the escape")
    assert "[SHARED]" in escape and f"read the canary: {token}" in escape
    assert "0 failed" in out


def test_explain_prints_the_shell_steps_of_each_section(python, tmp_path):
    result = run_tour(python, tmp_path, "--stage", "1", "--explain")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.count("the same steps, as a person would type them:") == 3
    rootfs = os.path.join(tmp_path, "home", "rootfs", "busybox")
    assert f"    chroot {rootfs}" in out
    assert "    mount --make-rprivate /" in out
    assert "    chroot /.stages-escape" in out and "    cd ../" in out


def test_an_unknown_stage_is_one_clear_sentence(python, tmp_path):
    result = run_tour(python, tmp_path, "--stage", "9")
    assert result.returncode == 1
    assert "the tour has no stage 9" in result.stderr and "hint: choose from: 1" in result.stderr


def test_sections_return_their_findings_and_a_later_stage_can_add_itself(tmp_path, busybox_rootfs):
    seen = []

    @tour.section(99, "a stage added later")
    def later(t: tour.Tour) -> tour.Section:
        seen.append(t.facts["stage1 escape"].escaped)
        return tour.Section(findings=[tour.Finding("hello", "from stage 99", isolated=True)])

    try:
        out = io.StringIO()
        results = tour.run([1, 99], rootfs=busybox_rootfs, out=out)
    finally:
        tour.SECTIONS.pop()
    assert [(r.stage, r.title) for r in results][-1] == (99, "a stage added later")
    assert seen == [True]  # facts left by stage 1 reach later sections
    observed = {f.subject: f for r in results if r.stage == 1 for f in r.findings}
    assert observed["files"].isolated is True
    assert observed["hostname"].isolated is False
    assert observed["the escape"].isolated is False
    assert "== stage 99 ==" in out.getvalue() and "[isolated] from stage 99" in out.getvalue()
    assert 99 not in tour.stages_available()
