#!/usr/bin/env bash
# boot.sh - boot the cgroup v2 test VM once: it runs the job in SHARE/job and powers off.
#
#   bash tests/vm/boot.sh ARTIFACTS SHARE [REPO]
#
# ARTIFACTS is the directory tests/vm/build.sh printed. SHARE is a directory of the caller's: the guest
# mounts it read-write at /mnt/share, runs `sh /mnt/share/job` as root, and leaves what the job wrote
# in SHARE/out/ (and its exit status in SHARE/out/rc). REPO (default: this checkout) is mounted
# read-only at /mnt/repo. The serial console (the kernel's and the job's messages) goes to stdout.
#
# Software emulation (TCG), not KVM: it needs nothing from the host's CPU or /dev/kvm, and the /dev/kvm
# of a nested sandbox may not run a stock kernel at all. Under TCG Python runs ~12x slower than on the
# host and starting a process ~35x, which is why the job is the cgroup and namespace tests only.
#
# The VM has no network: its one network card (eth0, as on any machine) is plugged into an emulated hub
# with nothing else on it, so no packet can leave.
#
# The CPU model is the plain x86-64 baseline (qemu64), not `max`: with AVX2 on offer the guest's glibc
# picks string functions that TCG emulates slowly; measured, the tests run ~30% faster without.
#
# Environment: TIMEOUT (seconds, default 300: QEMU is killed after it), MEM (MiB, 1024), SMP (2),
# CPU (the QEMU CPU model, qemu64).
# Exit status: QEMU's (0 after the guest powered off; 124 or 137 when it was killed on timeout).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
if (($# < 2)); then
    echo "usage: bash tests/vm/boot.sh ARTIFACTS SHARE [REPO]" >&2
    exit 2
fi
artifacts=$(cd "$1" && pwd)
share=$(cd "$2" && pwd)
repo=$(cd "${3:-$here/../..}" && pwd)
[[ -f $artifacts/ready ]] || { echo "boot.sh: $artifacts is not a finished build of tests/vm/build.sh" >&2; exit 2; }

# snapshot=on writes the guest's changes to a temporary file (under TMPDIR) and drops them at exit:
# the cached image stays as built, and two test runs can boot it at the same time.
export TMPDIR=$share
# The kernel command line:
#   cgroup_no_v1=all  no controller can be bound to a v1 hierarchy: the machine is cgroup v2 only;
#   panic=-1          if PID 1 dies, reboot at once, which -no-reboot turns into QEMU exiting;
#   console=ttyS0     the serial port is our stdout; quiet + loglevel=4 keeps it to warnings and up.
exec timeout --kill-after=5 "${TIMEOUT:-300}" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu "${CPU:-qemu64}" -machine q35 -m "${MEM:-1024}" -smp "${SMP:-2}" \
    -nodefaults -nographic -no-reboot -serial stdio \
    -netdev hubport,id=nowhere,hubid=0 -device virtio-net-pci,netdev=nowhere,romfile= \
    -kernel "$artifacts/vmlinux" -initrd "$artifacts/initrd.cpio.gz" \
    -append "console=ttyS0 quiet loglevel=4 panic=-1 cgroup_no_v1=all" \
    -drive "file=$artifacts/rootfs.img,format=raw,if=virtio,snapshot=on" \
    -virtfs "local,path=$share,mount_tag=share,security_model=none,id=share" \
    -virtfs "local,path=$repo,mount_tag=repo,security_model=none,readonly=on,id=repo" \
    </dev/null
