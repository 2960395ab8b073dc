#!/usr/bin/env bash
# Install vfsnap on Debian 12: system packages, a virtualenv in .venv, and the `vfsnap` command.
#   scripts/setup.sh          what vfsnap needs to run
#   scripts/setup.sh --test   plus what the tests and benchmarks need
# Nothing is assumed from an earlier run: every package is (re)installed by name.
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"

runtime_packages=(fuse3 libfuse3-dev pkg-config gcc python3 python3-venv python3-dev qemu-utils attr)
# qemu-system-common: qemu-storage-daemon (benchmark reference); fio, rsync: real clients in tests;
# glusterfs-server, glusterfs-client: the GlusterFS volume of tests/gluster.py (which installs them too);
# util-linux, mount: setpriv, unshare, nsenter, mount(8) (required in Debian, named so nothing is assumed).
test_packages=(qemu-system-common fio rsync e2fsprogs psmisc glusterfs-server glusterfs-client util-linux mount)

packages=("${runtime_packages[@]}")
[ "$with_tests" = 1 ] && packages+=("${test_packages[@]}")

export DEBIAN_FRONTEND=noninteractive
if ! dpkg -s "${packages[@]}" >/dev/null 2>&1; then
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
# setuptools (>= 80) notes every editable install with a boxed "Editable installation" warning
# that asks nothing of the reader: kept off a newcomer's first screen (other warnings still show).
if [ "$with_tests" = 1 ]; then
    PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
else
    PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi

# mount(8) runs helpers with a sanitized PATH: put the commands where it looks.
if [ -w /usr/local/bin ]; then
    ln -sf "$PWD/.venv/bin/vfsnap" /usr/local/bin/vfsnap
    if [ -x .venv/bin/mount.vfsnap ] && [ -w /sbin ]; then
        # mount.vfsnap for type vfsnap, mount.fuse.vfsnap for type fuse.vfsnap (fstab).
        ln -sf "$PWD/.venv/bin/mount.vfsnap" /sbin/mount.vfsnap
        ln -sf "$PWD/.venv/bin/mount.vfsnap" /sbin/mount.fuse.vfsnap
    fi
fi
echo "vfsnap installed: $PWD/.venv/bin/vfsnap"
