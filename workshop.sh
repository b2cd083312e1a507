#!/usr/bin/env bash
# The two commands of the README, on a fresh Debian 12 / Ubuntu 24.04 machine, as root:
#
#   bash workshop.sh tour    # the whole chroot-to-container tour on the embedded rootfs
#   bash workshop.sh test    # the full test suite (ruff, pytest, the notebooks)
#
# Each installs what it needs first: Debian packages through apt-get when they are missing, a
# virtualenv in .venv, and this package with its extras. Running it again installs nothing new.
# The Vagrant VM's provisioning calls this same script (`bash workshop.sh setup`).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
job=${1:-}
shift || true

say() { printf '\033[1m[workshop]\033[0m %s\n' "$*" >&2; }

if [[ $job != tour && $job != test && $job != setup ]]; then
    echo "usage: bash workshop.sh tour|test|setup [arguments for the job]" >&2
    exit 2
fi
if [[ $(id -u) != 0 ]]; then
    echo "workshop.sh: this needs root (namespaces, mounts and apt-get do); try: sudo bash workshop.sh $job" >&2
    exit 1
fi

# -- Debian packages ------------------------------------------------------------------------------
packages=(busybox-static iproute2 iptables nftables procps util-linux)
# stage 3's container init (stages/runtime/init.c) is built static on first use: a C compiler, libc.a
packages+=(gcc libc6-dev)
if [[ $job == test || $job == setup ]]; then
    # the cgroup v2 VM (tests/vm): QEMU software emulation, debootstrap, the initramfs tools
    packages+=(qemu-system-x86 debootstrap cpio e2fsprogs)
    # vagrant/ (tests/test_vagrant.py): shellcheck for provision.sh, vagrant to validate the Vagrantfile
    packages+=(shellcheck)
    # podman driving stages-oci (tests/test_podman.py), and runc and crun beside it (make bench, notebook
    # 07): podman brings conmon and containers-common; images come from `podman import`, never a registry
    packages+=(podman conmon runc crun)
    # the runtime spec's JSON schemas (tests/test_oci_cli.py checks `stages-oci state` against them)
    packages+=(golang-github-opencontainers-specs-dev)
    # The notebooks in a real browser (tests/test_browser.py) drive Debian's chromium deb (Ubuntu ships
    # chromium only as a snap); vagrant too comes from Debian. Elsewhere those tests skip, saying why.
    if grep -qsx 'ID=debian' /etc/os-release; then
        packages+=(chromium vagrant)
    fi
fi
python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null 2>&1; then
    packages+=(python3)
    python=python3
fi
missing=()
for package in "${packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
# A fresh Debian/Ubuntu python3 has no venv module until python3-venv is installed.
if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=("python3-venv")
fi
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# -- the virtualenv ---------------------------------------------------------------------------------
extras="test"
[[ $job == tour ]] && extras=""
stamp=".venv/.installed-${extras:-base}"
if [[ ! -x .venv/bin/python ]]; then
    say "creating the virtualenv .venv"
    "$python" -m venv .venv
fi
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    say "installing stages${extras:+[$extras]} into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    # A "compat" editable install is one line in a .pth file (the repository's path); the default one
    # installs an import finder that costs ~11 ms at every interpreter start, and stages-oci is started
    # several times per container by podman. setuptools calls compat transitional: fall back when gone.
    .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}" --config-settings editable_mode=compat \
        2>/dev/null || .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
    touch "$stamp"
fi

case $job in
    setup) exit 0 ;;
    tour) exec .venv/bin/stages tour "$@" ;;
    test)
        say "ruff"
        .venv/bin/ruff check stages tests notebooks
        say "shellcheck: the cgroup v2 VM's scripts"
        shellcheck tests/vm/*.sh tests/vm/guest/vm-init tests/vm/guest/initramfs-init tests/vm/guest/job.sh
        say "pytest: the library, the command line and the notebooks"
        exec .venv/bin/python -m pytest -p no:cacheprovider -q tests notebooks --nbmake "$@"
        ;;
esac
