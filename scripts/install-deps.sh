#!/usr/bin/env bash
# Installs the host packages the test suite needs (QEMU for the end-to-end tests, the tools
# scripts/guest/build.sh uses). Returns at once when everything is already there.
#
# Order matters: on these machines `qemu-system-x86` (7.2) removes the preinstalled
# `qemu-utils` 10.x backport, so `qemu-utils` is installed again afterwards to get
# `qemu-img` 7.2 back. `qemu-storage-daemon` ships in `qemu-system-common`.
set -euo pipefail

# command -> Debian package that provides it.
declare -A TOOLS=(
    [qemu-system-x86_64]=qemu-system-x86
    [qemu-storage-daemon]=qemu-system-common
    [qemu-img]=qemu-utils
    [busybox]=busybox-static
    [cpio]=cpio
    [gzip]=gzip
    [xz]=xz-utils
    [modinfo]=kmod
    [flock]=util-linux
    [blkdiscard]=util-linux
    [mkfs.ext4]=e2fsprogs
    # strait wanem and its tests build network namespaces with `ip netns`.
    [ip]=iproute2
)

# The packages behind the tools that are absent, each once. Only those are installed, so a
# rerun does not upgrade anything as a side effect.
missing_packages() {
    local tool
    for tool in "${!TOOLS[@]}"; do
        command -v "$tool" >/dev/null || echo "${TOOLS[$tool]}"
    done | sort -u
}

packages=$(missing_packages)
[ -n "$packages" ] || exit 0
[ "$(id -u)" -eq 0 ] || {
    echo "install-deps.sh: not root; missing packages: $(tr '\n' ' ' <<<"$packages")" >&2
    exit 1
}

export DEBIAN_FRONTEND=noninteractive
apt_install() {
    apt-get install -y -q --no-install-recommends "$@" || {
        apt-get update -q
        apt-get install -y -q --no-install-recommends "$@"
    }
}

if grep -qx qemu-system-x86 <<<"$packages"; then
    apt_install qemu-system-x86
fi
# Re-evaluated: installing qemu-system-x86 may just have removed qemu-utils (see above).
packages=$(missing_packages)
if [ -n "$packages" ]; then
    # shellcheck disable=SC2086 # one package per word
    apt_install $packages
fi

still_missing=$(missing_packages)
if [ -n "$still_missing" ]; then
    echo "install-deps.sh: still missing after apt: $(tr '\n' ' ' <<<"$still_missing")" >&2
    exit 1
fi
