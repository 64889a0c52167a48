#!/usr/bin/env bash
# The main job, until live migration lands: boot the tiny test guest under QEMU (TCG) with
# its disk served by `strait serve`, let it write random data with O_DIRECT and read it
# back, then show what the guest saw, what the image on the host holds, and the engine's
# own view (`strait ctl status` / `stats`).
set -euo pipefail

readonly REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly MIB="${DEMO_MIB:-16}"
readonly QUEUES="${DEMO_QUEUES:-2}"

cd "$REPO"
bash scripts/install-deps.sh
GUEST="$(bash scripts/guest/build.sh)"
cargo build --release -p strait-engine --bin strait
STRAIT="$REPO/target/release/strait"

WORK="$(mktemp -d)"
SERVE_PID=""
cleanup() {
    [ -n "$SERVE_PID" ] && kill "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

truncate -s 256M "$WORK/disk.img"
echo "== strait serve: 256 MiB image, $QUEUES queues"
"$STRAIT" serve --disk "$WORK/disk.img" --vhost-socket "$WORK/vhost.sock" \
    --control "$WORK/control.sock" --queues "$QUEUES" --cores 0-$(( $(nproc) > 1 ? 1 : 0 )) \
    2> "$WORK/serve.log" &
SERVE_PID=$!
for _ in $(seq 50); do [ -S "$WORK/control.sock" ] && break; sleep 0.1; done

echo "== booting the guest (QEMU, TCG); it writes $MIB MiB with O_DIRECT and reads it back"
timeout 180 qemu-system-x86_64 -accel tcg -m 256M -smp 2 \
    -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
    -chardev socket,id=c0,path="$WORK/vhost.sock" \
    -device vhost-user-blk-pci,chardev=c0,num-queues="$QUEUES" \
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.gz" \
    -append "console=ttyS0 quiet panic=-1 strait.test=rw strait.arg=$MIB" \
    -nographic -no-reboot -display none > "$WORK/console.log" 2>&1 &
QEMU_PID=$!
# The engine's view while the VMM is attached, once the guest's driver has negotiated.
for _ in $(seq 150); do
    if "$STRAIT" ctl --control "$WORK/control.sock" status | grep -q 'acked:.*FLUSH'; then
        echo "== strait ctl status (while the guest runs)"
        "$STRAIT" ctl --control "$WORK/control.sock" status
        break
    fi
    sleep 0.1
done
wait "$QEMU_PID" || true

echo "== what the guest printed"
grep '^STRAIT-' "$WORK/console.log" | tr -d '\r'
line="$(grep '^STRAIT-RESULT md5_written' "$WORK/console.log" | tr -d '\r')"
offset="$(grep -o 'offset=[0-9]*' "$WORK/console.log" | head -1 | cut -d= -f2)"
written="$(sed -n 's/.*md5_written=\([0-9a-f]*\).*/\1/p' <<<"$line")"
host="$(dd if="$WORK/disk.img" bs=1M skip=$((offset / 1048576)) count="$MIB" 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "== the image on the host"
echo "md5 of the $MIB MiB the guest wrote, read from the host image: $host"
echo "== strait ctl stats (after the guest powered off)"
"$STRAIT" ctl --control "$WORK/control.sock" stats
if grep -q 'STRAIT-VERDICT PASS' "$WORK/console.log" && [ "$written" = "$host" ]; then
    echo "== DEMO PASS: the guest read back what it wrote, and the host image holds the same bytes"
else
    echo "== DEMO FAIL (console: $WORK/console.log)"; cat "$WORK/serve.log"; exit 1
fi
