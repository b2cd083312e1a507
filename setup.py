"""The one build step pyproject.toml cannot say: stage 3's container init, compiled when the wheel is built.

The init (stages/runtime/init.c) runs as PID 1 inside the container, after pivot_root(2), where the host's
Python is out of reach: it must be a static program. A wheel built where a C compiler and a static libc
are (Debian: gcc, libc6-dev) carries it as stages/runtime/stages-init, so a teacher's laptop without a
compiler still runs containers with an init; such a wheel is tagged for its platform (py3-none-linux_x86_64:
any Python 3, this CPU). Without a compiler the build still succeeds, gives a pure wheel (py3-none-any), and
stage 3 compiles init.c on first use instead, or runs without an init (see stages.runtime.overlay).
Everything else is in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

SOURCE = os.path.join("stages", "runtime", "init.c")
PROGRAM = os.path.join("stages", "runtime", "stages-init")


def compile_init(source: str, program: str) -> str | None:
    """Compile ``source`` static into ``program``; None on success, else why not (one line)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return "no C compiler (cc or gcc) on PATH"
    os.makedirs(os.path.dirname(program), exist_ok=True)
    result = subprocess.run([compiler, "-static", "-O2", "-s", "-o", program, source], capture_output=True,
                            text=True)
    if result.returncode != 0:
        with_error = (result.stderr.strip().splitlines() or [f"status {result.returncode}"])[-1]
        return f"{compiler} -static failed (Debian: apt-get install libc6-dev): {with_error}"
    return None


class BuildWithInit(build_py):
    """build_py, then the init compiled into the build directory (never into the source tree)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads init.c from the tree and compiles it on first use
        program = os.path.join(self.build_lib, PROGRAM)
        why_not = compile_init(SOURCE, program)
        if why_not is None:
            print(f"stages: compiled the container init into {program}")
        else:
            print(f"stages: WARNING: the wheel gets no prebuilt container init ({why_not}); "
                  "stage 3 will compile init.c on first use, or run without an init")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        program = os.path.join(self.build_lib, PROGRAM)
        return [*outputs, program] if os.path.exists(program) else outputs


class PlatformWheel(bdist_wheel):
    """A wheel with the prebuilt init is for one platform (any Python 3): py3-none-linux_x86_64."""

    def run(self) -> None:
        if not self.skip_build:
            self.run_command("build")
        build_lib = self.get_finalized_command("build_py").build_lib
        self.root_is_pure = not os.path.exists(os.path.join(build_lib, PROGRAM))
        if not self.root_is_pure:
            # install (run below) puts the package in platlib, not .data/purelib, when the distribution
            # says it has something built for the platform
            self.distribution.has_ext_modules = lambda: True
        super().run()  # the build has run already: commands run once

    def get_tag(self) -> tuple[str, str, str]:
        impl, abi, platform = super().get_tag()
        if self.root_is_pure:
            return impl, abi, platform
        return "py3", "none", platform  # a static program: no Python ABI in it


setup(cmdclass={"build_py": BuildWithInit, "bdist_wheel": PlatformWheel})
