#!/bin/sh
# job.sh - runs inside the test VM (the host's job file execs it): the project's tests, on cgroup v2.
#
#   sh /mnt/repo/tests/vm/guest/job.sh PYTEST_ARGUMENTS...
#
# It writes to /mnt/share/out/, which the host reads after the VM powered off:
#   facts.json  what the machine is (facts.py): the cgroup mounts, the controllers, kernel, python;
#   junit.xml   pytest's report, each test case with a "markers" property (vm_markers.py);
#   pytest.log  pytest's own output.
# The exit status is pytest's.
out=/mnt/share/out
mkdir -p "$out"
cd /mnt/repo || exit 2
# The repository is a read-only share: import stages from it as it is (no pip install), write no
# bytecode and no pytest cache next to it, and keep temporary files on the guest's tmpfs /tmp.
export PYTHONPATH=/mnt/repo:/mnt/repo/tests/vm/guest TMPDIR=/tmp
# Its bytecode goes to the prefix the image's standard library was compiled into (tests/vm/build.sh),
# compiled once here rather than in each of the hundred processes that import stages.
export PYTHONPYCACHEPREFIX=/var/cache/pycache
# (Test modules not: pytest compiles them itself, to rewrite their asserts.)
python3 -m compileall -qq /mnt/repo/stages
export PYTHONDONTWRITEBYTECODE=1
python3 tests/vm/guest/facts.py >"$out/facts.json"
python3 -m pytest -p no:cacheprovider -p vm_markers -q -rfEs --basetemp=/tmp/pytest \
    -W ignore::pytest.PytestConfigWarning \
    --junitxml="$out/junit.xml" "$@" >"$out/pytest.log" 2>&1
rc=$?
# The end of the log on the console too, for whoever reads the serial output.
tail -n 15 "$out/pytest.log"
exit $rc
