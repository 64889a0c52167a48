#!/usr/bin/env bash
# Installs the host packages the test suite needs (QEMU for the end-to-end tests, the tools
# scripts/guest/build.sh uses). Returns at once when everything is already there.
#
# QEMU comes from bookworm-backports (10.x), not from bookworm (7.2): QEMU before 9.0 loses
# guest memory writes during a migration under TCG (its dirty-bitmap sync leaves the TCG TLB
# believing pages are still dirty, so later stores set no dirty bit; fixed upstream in commit
# 03bfc2188f, QEMU 9.0), and KVM hangs on these machines, so every migration here runs under
# TCG. qemu-storage-daemon 7.2 also deadlocks on SIGTERM with a vhost-user client connected.
# `qemu-system-x86`, `qemu-system-common` (qemu-storage-daemon) and `qemu-utils` (qemu-img)
# are installed together from the same suite so their versions match.
set -euo pipefail

# The oldest QEMU whose migration under TCG keeps every guest write (see above).
readonly MIN_QEMU_MAJOR=9
readonly BACKPORTS=bookworm-backports
readonly BACKPORTS_LIST=/etc/apt/sources.list.d/strait-bookworm-backports.sources

# command -> Debian package that provides it (QEMU's three are handled apart, below).
declare -A TOOLS=(
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
    # The bench/ scripts read the JSON strait prints and write their results with it.
    [jq]=jq
)
readonly QEMU_TOOLS=(qemu-system-x86_64 qemu-storage-daemon qemu-img)
readonly QEMU_PACKAGES=(qemu-system-x86 qemu-system-common qemu-utils)

# The packages behind the tools that are absent, each once. Only those are installed, so a
# rerun does not upgrade anything as a side effect.
missing_packages() {
    local tool
    for tool in "${!TOOLS[@]}"; do
        command -v "$tool" >/dev/null || echo "${TOOLS[$tool]}"
    done | sort -u
}

# The major version a QEMU tool reports ("... version 10.0.2 (Debian ...)"), 0 if absent.
qemu_major() {
    local out
    out=$("$1" --version 2>/dev/null | head -n1) || { echo 0; return; }
    sed -nE 's/.*version ([0-9]+)\..*/\1/p' <<<"$out" | grep . || echo 0
}

qemu_ok() {
    local tool
    for tool in "${QEMU_TOOLS[@]}"; do
        [ "$(qemu_major "$tool")" -ge "$MIN_QEMU_MAJOR" ] || return 1
    done
}

# What to say about QEMU when something is missing: nothing if it is recent enough.
qemu_wanted() {
    qemu_ok || echo "QEMU >= $MIN_QEMU_MAJOR (from $BACKPORTS)"
}

# Whether an apt source already names the backports suite on a line that is not a comment.
backports_listed() {
    grep -rqsE "^[^#]*\b$BACKPORTS\b" /etc/apt/sources.list /etc/apt/sources.list.d/
}

packages=$(missing_packages)
if [ -z "$packages" ] && qemu_ok; then
    exit 0
fi
[ "$(id -u)" -eq 0 ] || {
    echo "install-deps.sh: not root; missing: $(tr '\n' ' ' <<<"$packages")" \
        "$(qemu_wanted)" >&2
    exit 1
}

export DEBIAN_FRONTEND=noninteractive
apt_install() {
    apt-get install -y -q --no-install-recommends "$@" || {
        apt-get update -q
        apt-get install -y -q --no-install-recommends "$@"
    }
}

if ! qemu_ok; then
    if ! backports_listed; then
        cat >"$BACKPORTS_LIST" <<SOURCES
Types: deb
URIs: http://deb.debian.org/debian
Suites: $BACKPORTS
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
        apt-get update -q
    fi
    apt_install -t "$BACKPORTS" "${QEMU_PACKAGES[@]}"
fi
packages=$(missing_packages)
if [ -n "$packages" ]; then
    # shellcheck disable=SC2086 # one package per word
    apt_install $packages
fi

still_missing=$(missing_packages)
if [ -n "$still_missing" ] || ! qemu_ok; then
    echo "install-deps.sh: still missing after apt: $(tr '\n' ' ' <<<"$still_missing")" \
        "$(qemu_wanted)" >&2
    exit 1
fi
