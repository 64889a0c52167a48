#!/usr/bin/env bash
# Builds the tiny test guest that engine/tests/common/ boots under QEMU: a Debian cloud
# kernel (`vmlinuz`) and a busybox initramfs (`initramfs.gz`) whose /init (init.sh next to
# this script) runs one disk scenario and prints its verdict on the serial console.
#
# Output goes to ${STRAIT_GUEST_DIR:-<repo>/.cache/guest}. Nothing here is committed as a
# binary: the kernel and busybox come from the Debian archive with `apt-get download` and are
# unpacked with `dpkg -x`, never installed on the host. A stamp (the hash of this script and
# init.sh) makes a second run return at once; editing either file rebuilds. Concurrent runs
# (several test binaries at once) serialise on a lock file in the output folder.
#
# Usage: scripts/guest/build.sh    (prints the output folder on stdout)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"
readonly SCRIPT_DIR REPO
readonly OUT="${STRAIT_GUEST_DIR:-$REPO/.cache/guest}"
readonly KERNEL_META_PACKAGE=linux-image-cloud-amd64
# Load order matters: each module's dependencies come before it. The build checks this
# against the modules' own `depends=` so a kernel update cannot silently break it.
readonly MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)

log() { echo "guest/build.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Host tools this script runs; busybox-static and the kernel are only downloaded.
ensure_host_tools() {
    local -A tool_package=([cpio]=cpio [gzip]=gzip [xz]=xz-utils [flock]=util-linux
        [dpkg-deb]=dpkg [apt-get]=apt [sha256sum]=coreutils)
    local missing=() tool
    for tool in "${!tool_package[@]}"; do
        command -v "$tool" >/dev/null || missing+=("${tool_package[$tool]}")
    done
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" -eq 0 ] || die "missing host packages (install as root): ${missing[*]}"
    log "installing host packages: ${missing[*]}"
    apt-get install -y -q "${missing[@]}" >&2 || {
        apt-get update -q >&2
        apt-get install -y -q "${missing[@]}" >&2
    }
}

stamp_key() {
    cat "$SCRIPT_DIR/build.sh" "$SCRIPT_DIR/init.sh" | sha256sum | cut -d' ' -f1
}

is_built() {
    [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$(stamp_key)" ] &&
        [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initramfs.gz" ]
}

# The versioned kernel package the meta package currently depends on.
kernel_package() {
    apt-cache depends "$KERNEL_META_PACKAGE" 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1
}

# Downloads packages into the current folder; refreshes the apt lists only if that fails.
download() {
    apt-get download -q "$@" >&2 && return
    log "apt-get download failed; running apt-get update and retrying"
    apt-get update -q >&2
    apt-get download -q "$@" >&2
}

# Copies module $1 from the unpacked kernel tree $2 to $3/$1.ko, decompressed (busybox insmod
# does not read compressed modules), and checks that its dependencies were loaded before it.
install_module() {
    local name=$1 tree=$2 dest=$3 found dep
    found=$(find "$tree/lib/modules" -name "$name.ko" -o -name "$name.ko.xz" \
        -o -name "$name.ko.zst" -o -name "$name.ko.gz" | head -n1)
    [ -n "$found" ] || die "module $name not found in the kernel package"
    case "$found" in
    *.xz) xz -dc "$found" >"$dest/$name.ko" ;;
    *.gz) gzip -dc "$found" >"$dest/$name.ko" ;;
    *.zst) zstd -dqc "$found" >"$dest/$name.ko" ;;
    *) cp "$found" "$dest/$name.ko" ;;
    esac
    for dep in $(tr '\0' '\n' <"$dest/$name.ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
        [ -f "$dest/$dep.ko" ] || die "module $name needs $dep, which is not loaded before it"
    done
}

build() {
    local work pkg
    work=$(mktemp -d "$OUT/work.XXXXXX")
    # shellcheck disable=SC2064 # expand $work now: it is local.
    trap "rm -rf '$work'" EXIT

    pkg=$(kernel_package)
    if [ -z "$pkg" ]; then
        apt-get update -q >&2
        pkg=$(kernel_package)
    fi
    [ -n "$pkg" ] || die "cannot resolve the package behind $KERNEL_META_PACKAGE"
    log "downloading $pkg and busybox-static"
    mkdir -p "$work/debs"
    # apt fetches as the unprivileged `_apt` user when it can reach the folder; otherwise it
    # warns and fetches as root.
    if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then
        chmod 0755 "$work" && chown _apt "$work/debs"
    fi
    (cd "$work/debs" && download "$pkg" busybox-static)
    dpkg-deb -x "$work"/debs/linux-image-*.deb "$work/kernel"
    dpkg-deb -x "$work"/debs/busybox-static_*.deb "$work/busybox"

    local root="$work/root" app
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,etc,lib/modules}
    cp "$work/busybox/bin/busybox" "$root/bin/busybox"
    # What `busybox --install -s` does at boot, done here so boot does not pay for it.
    for app in $("$root/bin/busybox" --list-full); do
        [ -e "$root/$app" ] || [ -L "$root/$app" ] || ln -s /bin/busybox "$root/$app"
    done
    for m in "${MODULES[@]}"; do
        install_module "$m" "$work/kernel" "$root/lib/modules"
    done
    printf '%s\n' "${MODULES[@]}" >"$root/etc/strait-modules"
    install -m 0755 "$SCRIPT_DIR/init.sh" "$root/init"

    (cd "$root" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc -R 0:0 --quiet | gzip -6) >"$work/initramfs.gz"
    cp "$work"/kernel/boot/vmlinuz-* "$work/vmlinuz"

    mv -f "$work/vmlinuz" "$OUT/vmlinuz"
    mv -f "$work/initramfs.gz" "$OUT/initramfs.gz"
    printf 'KERNEL_PACKAGE=%s\nKERNEL_RELEASE=%s\n' "$pkg" \
        "$(basename "$work"/kernel/lib/modules/*)" >"$OUT/guest.env"
    stamp_key >"$OUT/stamp"
    log "built $OUT/vmlinuz and $OUT/initramfs.gz ($(du -h "$OUT/initramfs.gz" | cut -f1))"
}

main() {
    mkdir -p "$OUT"
    # Fast path without any tool beyond coreutils: the stamp matches.
    if is_built; then
        echo "$OUT"
        return
    fi
    ensure_host_tools
    exec 9>"$OUT/.lock"
    flock 9
    # Another process may have built it while this one waited for the lock.
    is_built || build
    echo "$OUT"
}

main "$@"
