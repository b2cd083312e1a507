#!/usr/bin/env bash
# build.sh - build (or find in the cache) the cgroup v2 test VM: a Debian kernel, a busybox initramfs
# and an ext4 root filesystem image. Prints the directory that holds them as its last line of output.
#
#   bash tests/vm/build.sh          # as root; ~60 s the first time, instant when cached
#
# Why a VM at all: the development and CI machines run cgroup v1 (hybrid), the workshop VM runs cgroup
# v2 only, and a process cannot move controllers between the two (cgroups(7), "Mounting"). So the v2
# code paths are tested on a real v2 kernel booted under QEMU (tests/vm/boot.sh).
#
# What it builds, under $STAGES_VM_CACHE (default /var/cache/stages-vm), in a directory named after a
# hash of everything that goes into it (suite, package list, kernel package, the guest scripts, this
# script), so a change to any of them builds afresh and a clean machine builds once:
#   vmlinux        the kernel linux-image-amd64 depends on, `apt-get download`ed and unpacked with
#                  `dpkg -x` (the host's /boot is untouched); uncompressed, because decompressing it
#                  under software emulation costs a second a boot;
#   initrd.cpio.gz a busybox initramfs that loads the virtio, ext4, 9p, overlay, veth and bridge
#                  modules (all the guest gets: the root file system has none) and switch_roots into the root filesystem (guest/initramfs-init);
#   rootfs.img     debootstrap --variant=minbase with python3, pytest, psutil, procps, iproute2,
#                  busybox-static and util-linux, no systemd: PID 1 is guest/vm-init. An initramfs
#                  alone would not do: pivot_root(2) refuses a rootfs (initramfs) as the old root.
#
# Environment: STAGES_VM_CACHE, SUITE (bookworm), MIRROR (default: the Debian mirror apt uses),
# PYTHON (an interpreter for the kernel unpacking, default python3).
# Needs root (apt-get, debootstrap), network access to the Debian mirror, and the Debian packages
# qemu-system-x86 debootstrap cpio e2fsprogs busybox-static (bash workshop.sh test installs them).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${STAGES_VM_CACHE:-/var/cache/stages-vm}
suite=${SUITE:-bookworm}
python=${PYTHON:-python3}
packages=python3,python3-pytest,python3-psutil,procps,iproute2,busybox-static,util-linux
# Loaded at boot by the initramfs: the disk and the shares (virtio, ext4, 9p), a network card (it leads
# nowhere, but a machine has one), and what containers use (overlay for image layers, veth and bridge
# for networking). crc32c: ext4 and jbd2 checksums. The root file system has no modules and no kmod.
modules="virtio_pci virtio_blk crc32c_generic ext4 9pnet_virtio 9p virtio_net overlay veth bridge"

say() { printf '[stages-vm build %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { say "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "this needs root (apt-get download and debootstrap); run it with sudo"
for tool in debootstrap mkfs.ext4 cpio busybox dpkg apt-get; do
    command -v "$tool" >/dev/null || die "$tool is missing: apt-get install qemu-system-x86 debootstrap cpio e2fsprogs busybox-static"
done

# The kernel package (linux-image-6.1.0-NN-amd64) that the metapackage points at today.
kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
kpkg=$(kernel_package)
if [[ -z $kpkg ]]; then
    say "apt knows no linux-image-amd64 yet: apt-get update"
    apt-get update -qq
    kpkg=$(kernel_package)
fi
[[ -n $kpkg ]] || die "no Debian kernel package (linux-image-amd64) is known to apt on this machine"
kver=${kpkg#linux-image-}

key=$(cat "$0" "$here/guest/initramfs-init" "$here/guest/vm-init" \
      <(printf '%s\n' "$suite" "$packages" "$modules" "$kpkg") | sha256sum | cut -c1-16)
artifacts=$cache/$suite-$key
if [[ -f $artifacts/ready ]]; then
    say "cached: $artifacts"
    echo "$artifacts"
    exit 0
fi

mkdir -p "$cache"
# One build at a time: a second test run waits for the first one's build instead of repeating it.
exec 9>"$cache/.lock"
flock 9
if [[ -f $artifacts/ready ]]; then
    echo "$artifacts"
    exit 0
fi
# Half-built directories of runs that were killed (SIGKILL skips the trap below).
for stale in "$cache"/.build-*; do
    [[ -d $stale ]] && ! kill -0 "${stale##*.build-}" 2>/dev/null && rm -rf "$stale"
done
build=$cache/.build-$$
trap 'rm -rf "$build"' EXIT
# A signal (the test's SIGTERM when pytest dies) ends the build through the EXIT trap above.
trap 'exit 143' TERM INT HUP
mkdir -p "$build/debs"
started=$SECONDS

# -- the kernel -------------------------------------------------------------------------------------------
say "apt-get download $kpkg"
download() { (cd "$build/debs" && apt-get download -q "$kpkg" 2>&1 | grep -v 'Download is performed unsandboxed'); }
if ! download; then
    say "download failed, the package lists may be stale: apt-get update and try again"
    apt-get update -qq
    kpkg=$(kernel_package) && kver=${kpkg#linux-image-}
    download || die "cannot download $kpkg from the Debian mirror"
fi
dpkg -x "$build"/debs/"$kpkg"_*.deb "$build/kernel"
busybox depmod -b "$build/kernel" "$kver"
# bzImage = a boot stub + an xz stream; QEMU boots the ELF vmlinux inside it directly (PVH entry).
"$python" - "$build/kernel/boot/vmlinuz-$kver" "$build/vmlinux" <<'PY'
import lzma
import sys

packed = open(sys.argv[1], "rb").read()
start = packed.find(b"\xfd7zXZ\x00")
with open(sys.argv[2], "wb") as out:
    out.write(lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(packed[start:]))
PY

# -- the root filesystem ------------------------------------------------------------------------------------
mirror=${MIRROR:-$(apt-cache policy | awk -v s=" $suite/main " 'index($0, s) && $2 ~ /^https?:/ {print $2; exit}')}
mirror=${mirror:-http://deb.debian.org/debian}
root=$build/rootfs
say "debootstrap --variant=minbase --include=$packages $suite ($mirror)"
# debootstrap mounts /proc and /sys inside the new root while it installs; in a mount namespace of its
# own those mounts never show on the host and vanish with it, even if it is killed (mount_namespaces(7)).
if ! unshare --mount --propagation private \
        debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" \
        >"$build/debootstrap.log" 2>&1; then
    tail -n 20 "$build/debootstrap.log" >&2
    die "debootstrap failed (the whole log was $build/debootstrap.log)"
fi
rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* \
       "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
# The guest's Python reads bytecode from one prefix (PYTHONPYCACHEPREFIX, python(1)): there the job can
# compile the repository's modules once per boot, as the read-only share cannot hold __pycache__, and
# every process that imports stages skips compiling it (~1 s a process under emulation). A prefix is
# all or nothing, so the standard library and pytest are compiled into it here, once.
chroot "$root" env PYTHONPYCACHEPREFIX=/var/cache/pycache \
    python3 -m compileall -qq /usr/lib/python3.11 /usr/lib/python3/dist-packages || true
install -m 0755 "$here/guest/vm-init" "$root/sbin/vm-init"
echo stages-vm >"$root/etc/hostname"
mkdir -p "$root/mnt/share" "$root/mnt/repo"
# mkfs.ext4 -d copies a directory into the new file system: no loop device, nothing mounted.
say "mkfs.ext4 -d rootfs rootfs.img"
mkfs.ext4 -q -F -L stages-vm -E root_owner=0:0 -d "$root" "$build/rootfs.img" 1G >/dev/null
rm -rf "$root"

# -- the initramfs ----------------------------------------------------------------------------------------
# The modules and everything they depend on, at their usual paths, with the matching lines of
# modules.dep, so that busybox modprobe loads each after its dependencies.
initrd=$build/initrd
moddir=lib/modules/$kver
mkdir -p "$initrd"/{bin,dev,proc,sys,newroot,"$moddir"}
install -m 0755 "$(command -v busybox)" "$initrd/bin/busybox"
install -m 0755 "$here/guest/initramfs-init" "$initrd/init"
echo "$modules" >"$initrd/etc-modules"
for module in $modules; do
    line=$(grep -E "(^|/)$module\.ko:" "$build/kernel/$moddir/modules.dep") \
        || die "the kernel $kver has no module $module"
    for file in $(echo "$line" | tr -d :); do
        mkdir -p "$initrd/$moddir/$(dirname "$file")"
        cp "$build/kernel/$moddir/$file" "$initrd/$moddir/$file"
        grep -E "^$file:" "$build/kernel/$moddir/modules.dep" >>"$initrd/$moddir/modules.dep"
    done
done
sort -u -o "$initrd/$moddir/modules.dep" "$initrd/$moddir/modules.dep"
(cd "$initrd" && find . | cpio -o -H newc --quiet | gzip -1) >"$build/initrd.cpio.gz"
rm -rf "$initrd" "$build/kernel" "$build/debs"

printf 'suite=%s\nkernel=%s\npackages=%s\nmodules=%s\nbuilt=%s\n' \
    "$suite" "$kpkg" "$packages" "$modules" "$(date -u +%FT%TZ)" >"$build/manifest"
touch "$build/ready"
# Older builds (another suite, an older kernel or package list) are ours and no longer used.
for old in "$cache"/*-*; do
    [[ -d $old ]] && rm -rf "$old"
done
mv "$build" "$artifacts"
trap - EXIT
say "built $artifacts in $((SECONDS - started)) s ($(du -sh "$artifacts" | cut -f1))"
echo "$artifacts"
