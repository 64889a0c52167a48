#!/bin/sh
# /init of the strait test guest (packed into the initramfs by scripts/guest/build.sh).
#
# Runs one scenario against the virtio-blk disk /dev/vda and reports on the serial console in
# a form the Rust harness (engine/tests/common/) parses:
#
#   STRAIT-RESULT key=value [key=value ...]     any number of lines, keys are unique per run
#   STRAIT-VERDICT PASS                         exactly one verdict line, always the last
#   STRAIT-VERDICT FAIL reason=<token>        (preceded by `STRAIT-DIAG dmesg: ...` lines)
#
# then powers the machine off (QEMU runs with -no-reboot, so it exits).
#
# Kernel command line parameters read from /proc/cmdline:
#   strait.test=rw|flush|discard|ro|info|verify|migrate   the scenario (required)
#   strait.arg=N        scenario argument: a length in MiB (1..64), for migrate a duration
#                       in seconds (1..600)
#   strait.off=BYTES    byte offset of the tested range (default 1 MiB, 4 KiB aligned)
#
# Scenarios:
#   rw       write N MiB (default 8) of random data at off with O_DIRECT, drop caches, read
#            it back with O_DIRECT; PASS iff md5_written == md5_read. Also md5_disk.
#   flush    write N MiB (default 1) at off, then fsync the disk (a virtio FLUSH) and
#            blockdev --flushbufs; PASS iff nothing failed.
#   discard  write N MiB (default 4) of random data at off, blkdiscard the range, read it
#            back with O_DIRECT; PASS iff it reads as zeros.
#   ro       PASS iff /sys/block/vda/ro is 1, an O_DIRECT write fails and a read works.
#   info     print the disk's geometry and queues; always PASS once the disk shows up.
#   verify   read N MiB (default 8) at off and the whole disk; print their md5 (to check
#            data that someone else wrote), always PASS if the reads work.
#   migrate  the workload of a live-migration test, for N seconds (default 60) of guest
#            uptime. Fills the 4 MiB region at off (1024 blocks of 4 KiB) with counter 0,
#            then counts i = 1, 2, 3, ...: each step writes block (i mod 1024) with O_DIRECT
#            and prints `STRAIT-HB i=<i> up=<uptime s>`. Meanwhile a background loop
#            rewrites 16 MiB of random data in RAM, so memory keeps changing. At the end it
#            reads the region back with O_DIRECT; PASS iff every block holds the last i
#            written to it (blocks_bad=0). Prints duration_s first; at the end (so that a
#            migrated guest prints them on the destination) offset, length, block_size,
#            mem_copies, end_uptime_s, migrate_iterations (the last i), blocks_checked,
#            blocks_bad, md5_region (of the region as read).
#            The DMA check, in a background loop of its own (so the heartbeats never wait
#            for it): about once a second the 1 MiB after the region is written with new
#            random data (O_DIRECT) and read back through the page cache (buffered), so the
#            virtio-blk backend writes those page-cache pages and no vCPU writes them again:
#            a migration carries them only through the backend's dirty log. At the end the
#            range is read again through the page cache (no I/O if it is still cached):
#            prints dma_refreshes, md5_dma (the last data written), dma_ok (the cached read
#            equals it), dma_from_cache (1 if that read did no disk I/O); FAIL
#            reason=dma_mismatch otherwise.
#            Block b holding counter c is the text `strait-migrate i=<c>` (c left-aligned
#            in 10 columns), a newline, the first 4067 bytes of the 64 characters 0-9a-zA-Z+/
#            repeated, and a newline: 4096 bytes (engine/tests/common/qemu.rs builds the
#            same bytes to check a host image).

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
# A failing dd at the head of a `dd | md5sum` pipeline must fail the scenario. busybox ash
# has pipefail; POSIX sh does not, hence the directive.
# shellcheck disable=SC3040
set -o pipefail

DISK=/dev/vda
SYS=/sys/block/vda
MIB=1048576
# virtio-blk appears well under a second after the modules load, even under TCG; 10 s
# means the device is missing, not slow.
DISK_WAIT_TENTHS=100
# The guest has 256 MiB of RAM and the data is staged in the RAM-backed rootfs.
ARG_MIB_MAX=64
# A migration test may run the workload through several migrations; ten minutes is plenty
# and bounds the console transcript (about 3 MB at the TCG heartbeat rate).
MIGRATE_SECONDS_MAX=600
BLOCK_SIZE=4096
# 4 MiB: small enough to read back and check in about a second under TCG, large enough that
# a migration's dirty-block tracking sees many distinct blocks.
MIGRATE_BLOCKS=1024
MIGRATE_MEM_MIB=16
# The counter loop's rate is what resolves the downtime, so the memory loop yields to it and
# runs mostly while the counter loop waits on the disk. Measured under TCG on a loaded 2-core
# host, 10 s: nice 19 gave 86-110 heartbeats/s and 8-11 copies/s (130+ MB/s of memory
# changed); nice 0 gave 69/s and 12/s; no memory loop at all, 170/s.
MIGRATE_MEM_NICE=19
# The DMA check of the migrate scenario: the 1 MiB after the region gets new random data
# (O_DIRECT) and is read back through the page cache, so the backend writes guest pages
# that no vCPU writes again; then the loop sleeps this long. It runs beside the counter
# loop, not in it, so its CPU (urandom, two md5s, eight forks) only slows the heartbeats.
# Inline, every 100 steps, with readahead off, a refresh silenced them for about a second,
# which a downtime measured by the heartbeats' gap took for downtime whenever a stop fell
# in it (in the sweep at 760bd8e, every longest silence of a run was one); see the
# readahead in scenario_migrate for the larger part of that second.
MIGRATE_DMA_PAUSE_S=1
MIGRATE_DMA_NICE=19
MIGRATE_DMA_BYTES=$MIB
# The range's size in 512-byte sectors, blockdev --setra's unit.
MIGRATE_DMA_RA_SECTORS=$((MIGRATE_DMA_BYTES / 512))

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp

result() { echo "STRAIT-RESULT $*"; }

# Prints the verdict and powers off; never returns.
verdict() {
    echo "STRAIT-VERDICT $*"
    # stty applies its settings with TCSADRAIN, which waits until the UART has sent every
    # byte: without it `poweroff -f` can cut the last lines off the console.
    stty -F /dev/console -echo 2>/dev/null
    poweroff -f
    sleep 5
    echo "STRAIT-DIAG poweroff returned"
    exit 1
}

pass() {
    # Flush the device's write cache so the host sees everything the guest wrote (fsync on a
    # block device sends a virtio FLUSH; `poweroff -f` does not).
    sync "$DISK" 2>/dev/null
    verdict PASS
}

# Kernel messages that explain a failure (I/O errors, virtio complaints) that `quiet` kept off
# the console.
DIAG_DMESG_LINES=30

fail() {
    dmesg | tail -n "$DIAG_DMESG_LINES" | sed 's/^/STRAIT-DIAG dmesg: /'
    verdict "FAIL reason=$1"
}

md5_file() {
    md5sum <"$1" | cut -d' ' -f1
}

# md5 of LEN bytes of the disk at OFF, read with O_DIRECT so the page cache cannot answer.
md5_disk_range() {
    dd if="$DISK" bs=$MIB iflag=direct,skip_bytes,count_bytes skip="$1" count="$2" \
        status=none | md5sum | cut -d' ' -f1
}

md5_zeros() {
    dd if=/dev/zero bs=$MIB iflag=count_bytes count="$1" status=none | md5sum | cut -d' ' -f1
}

# Writes the file $1 to the disk at byte offset $2 with O_DIRECT.
write_at() {
    dd if="$1" of="$DISK" bs=$MIB oflag=direct,seek_bytes seek="$2" status=none
}

drop_caches() {
    echo 3 >/proc/sys/vm/drop_caches
}

# Stages $1 MiB of random data in /tmp/data.
make_data() {
    dd if=/dev/urandom of=/tmp/data bs=$MIB count="$1" status=none
}

# Fails unless OFF+LEN fits in the disk.
check_range() {
    size_bytes=$(blockdev --getsize64 "$DISK") || fail getsize_failed
    [ $(($1 + $2)) -le "$size_bytes" ] || fail range_beyond_disk
}

load_modules() {
    # shellcheck disable=SC2013 # one module name per line, no spaces
    for m in $(cat /etc/strait-modules); do
        insmod "/lib/modules/$m.ko" || fail "insmod_$m"
    done
}

wait_disk() {
    i=0
    while [ ! -b "$DISK" ]; do
        i=$((i + 1))
        [ "$i" -le "$DISK_WAIT_TENTHS" ] || fail no_disk
        usleep 100000
    done
}

param() {
    # shellcheck disable=SC2013 # the command line is split into words on purpose
    for word in $(cat /proc/cmdline); do
        case "$word" in
        "strait.$1="*) echo "${word#"strait.$1="}" ;;
        esac
    done
}

scenario_rw() {
    len=$((ARG_MIB * MIB))
    check_range "$OFF" "$len"
    result "offset=$OFF length=$len"
    make_data "$ARG_MIB" || fail datagen_failed
    md5_written=$(md5_file /tmp/data)
    write_at /tmp/data "$OFF" || fail write_failed
    drop_caches
    md5_read=$(md5_disk_range "$OFF" "$len") || fail read_failed
    md5_disk=$(md5sum "$DISK" | cut -d' ' -f1) || fail read_disk_failed
    result "md5_written=$md5_written md5_read=$md5_read md5_disk=$md5_disk"
    [ "$md5_written" = "$md5_read" ] || fail readback_mismatch
    pass
}

scenario_flush() {
    len=$((ARG_MIB * MIB))
    check_range "$OFF" "$len"
    result "offset=$OFF length=$len write_cache=$(tr ' ' '_' <$SYS/queue/write_cache)"
    make_data "$ARG_MIB" || fail datagen_failed
    result "md5_written=$(md5_file /tmp/data)"
    write_at /tmp/data "$OFF" || fail write_failed
    sync "$DISK" || fail fsync_failed
    blockdev --flushbufs "$DISK" || fail flushbufs_failed
    sync || fail sync_failed
    result "flush=ok"
    pass
}

scenario_discard() {
    len=$((ARG_MIB * MIB))
    check_range "$OFF" "$len"
    result "offset=$OFF length=$len discard_max_bytes=$(cat $SYS/queue/discard_max_bytes)" \
        "discard_granularity=$(cat $SYS/queue/discard_granularity)"
    make_data "$ARG_MIB" || fail datagen_failed
    write_at /tmp/data "$OFF" || fail write_failed
    md5_before=$(md5_disk_range "$OFF" "$len") || fail read_failed
    md5_zeros=$(md5_zeros "$len")
    [ "$md5_before" != "$md5_zeros" ] || fail data_was_zero_before_discard
    blkdiscard -o "$OFF" -l "$len" "$DISK" || fail blkdiscard_failed
    drop_caches
    md5_after=$(md5_disk_range "$OFF" "$len") || fail read_failed
    result "md5_before=$md5_before md5_after=$md5_after md5_zeros=$md5_zeros"
    [ "$md5_after" = "$md5_zeros" ] || fail not_zero_after_discard
    pass
}

scenario_ro() {
    ro=$(cat $SYS/ro)
    result "ro=$ro"
    [ "$ro" = 1 ] || fail not_read_only
    if dd if=/dev/zero of="$DISK" bs=4096 count=1 oflag=direct,seek_bytes seek="$OFF" \
        status=none 2>/dev/null; then
        fail write_succeeded
    fi
    result "write=refused"
    dd if="$DISK" of=/dev/null bs=$MIB count=1 iflag=direct status=none || fail read_failed
    md5_disk=$(md5sum "$DISK" | cut -d' ' -f1) || fail read_disk_failed
    result "md5_disk=$md5_disk"
    pass
}

scenario_info() {
    # A backend without VIRTIO_BLK_T_GET_ID makes reading the attribute fail.
    serial=$(cat $SYS/serial 2>/dev/null | tr -d '\n' | tr -c 'A-Za-z0-9._-' '_')
    result "size_sectors=$(cat $SYS/size) size_bytes=$(blockdev --getsize64 $DISK)"
    result "logical_block_size=$(cat $SYS/queue/logical_block_size)" \
        "physical_block_size=$(cat $SYS/queue/physical_block_size)"
    # shellcheck disable=SC2012 # the entries are queue numbers
    result "num_queues=$(ls $SYS/mq | wc -l) ro=$(cat $SYS/ro) serial=${serial:-none}"
    result "discard_max_bytes=$(cat $SYS/queue/discard_max_bytes)" \
        "write_zeroes_max_bytes=$(cat $SYS/queue/write_zeroes_max_bytes)" \
        "write_cache=$(tr ' ' '_' <$SYS/queue/write_cache)"
    pass
}

scenario_verify() {
    len=$((ARG_MIB * MIB))
    check_range "$OFF" "$len"
    result "offset=$OFF length=$len"
    md5_read=$(md5_disk_range "$OFF" "$len") || fail read_failed
    md5_disk=$(md5sum "$DISK" | cut -d' ' -f1) || fail read_disk_failed
    result "md5_read=$md5_read md5_disk=$md5_disk"
    pass
}

# Prints the text of the 4 KiB block holding counter $1 (see migrate in the header); $FILL
# must be set. printf is an ash builtin: no fork.
migrate_block() {
    printf 'strait-migrate i=%-10s\n%s\n' "$1" "$FILL"
}

# Prints the whole region as it must be once the counter reached $1: block b holds the last
# i <= $1 with i mod MIGRATE_BLOCKS = b, or 0 if there is none.
migrate_region() {
    b=0
    while [ "$b" -lt "$MIGRATE_BLOCKS" ]; do
        c=0
        [ "$1" -lt "$b" ] || c=$((b + ($1 - b) / MIGRATE_BLOCKS * MIGRATE_BLOCKS))
        migrate_block "$c"
        b=$((b + 1))
    done
}

# Rewrites /tmp/mem_dst from /tmp/mem_src until /tmp/mem_stop exists; then records how many
# copies it made in /tmp/mem_copies. Runs in the background.
migrate_memory_loop() {
    copies=0
    while [ ! -e /tmp/mem_stop ]; do
        dd if=/tmp/mem_src of=/tmp/mem_dst bs=$MIB conv=notrunc status=none || break
        copies=$((copies + 1))
    done
    echo "$copies" >/tmp/mem_copies
}

# The counter loop until ARG seconds of uptime have passed; leaves the last i in $i. Kept
# to one fork per step (dd): the block goes to a tmpfs file through a builtin first, since
# O_DIRECT needs whole blocks and a pipe may deliver a short read.
migrate_count() {
    first_block=$((OFF / BLOCK_SIZE))
    read -r up _ </proc/uptime
    end_s=$((${up%.*} + ARG))
    i=0
    while [ "${up%.*}" -lt "$end_s" ]; do
        i=$((i + 1))
        migrate_block "$i" >/tmp/block
        dd if=/tmp/block of="$DISK" bs=$BLOCK_SIZE count=1 oflag=direct status=none \
            seek=$((first_block + i % MIGRATE_BLOCKS)) || fail write_failed
        read -r up _ </proc/uptime
        echo "STRAIT-HB i=$i up=$up"
    done
}

# Refreshes the DMA range, then every MIGRATE_DMA_PAUSE_S, until /tmp/mem_stop exists (at
# least once); leaves the count and the last data's md5 in /tmp/dma_state. Runs in the
# background; a failure fails the scenario from here.
migrate_dma_loop() {
    dma_refreshes=0
    while :; do
        migrate_dma_refresh
        echo "$dma_refreshes $md5_dma" >/tmp/dma_state.new || fail datagen_failed
        mv /tmp/dma_state.new /tmp/dma_state || fail datagen_failed
        [ ! -e /tmp/mem_stop ] || break
        sleep "$MIGRATE_DMA_PAUSE_S"
    done
}

# New random data in the DMA range (O_DIRECT), then read back through the page cache: the
# read is what puts backend-written pages in guest RAM. Leaves the data's md5 in $md5_dma.
migrate_dma_refresh() {
    dd if=/dev/urandom of=/tmp/dma bs="$MIGRATE_DMA_BYTES" count=1 status=none ||
        fail datagen_failed
    dd if=/tmp/dma of="$DISK" bs="$MIGRATE_DMA_BYTES" count=1 oflag=direct,seek_bytes \
        seek="$DMA_OFF" status=none || fail write_failed
    # The direct write invalidated cached pages of the range; make sure of it.
    blockdev --flushbufs "$DISK" || fail flushbufs_failed
    md5_dma=$(md5_file /tmp/dma)
    got=$(dd if="$DISK" bs="$MIGRATE_DMA_BYTES" iflag=skip_bytes skip="$DMA_OFF" count=1 \
        status=none | md5sum | cut -d' ' -f1) || fail read_failed
    [ "$got" = "$md5_dma" ] || fail dma_readback_mismatch
    dma_refreshes=$((dma_refreshes + 1))
}

# Sectors read from the disk so far (field 3 of /sys/block/vda/stat).
sectors_read() {
    read -r _ _ sectors _ <$SYS/stat
    echo "$sectors"
}

# Counts the blocks in which /tmp/expect and /tmp/region differ, and prints the first few
# as STRAIT-DIAG lines (what the block should and does begin with).
migrate_bad_blocks() {
    cmp -s /tmp/expect /tmp/region && echo 0 && return
    cmp -l /tmp/expect /tmp/region 2>/dev/null |
        awk -v bs=$BLOCK_SIZE 'BEGIN { last = -1 }
            { b = int(($1 - 1) / bs); if (b != last) { n++; last = b; print b >"/tmp/bad" } }
            END { print n + 0 }'
    for b in $(head -n 4 /tmp/bad); do
        want=$(dd if=/tmp/expect bs=$BLOCK_SIZE skip="$b" count=1 status=none | head -c 27 |
            tail -c 10 | tr -d ' ')
        got=$(dd if=/tmp/region bs=$BLOCK_SIZE skip="$b" count=1 status=none | head -c 27 |
            tr -c 'A-Za-z0-9=-' '.')
        echo "block=$b want_i=$want got=$got" >&2
    done
}

scenario_migrate() {
    len=$((MIGRATE_BLOCKS * BLOCK_SIZE))
    DMA_OFF=$((OFF + len))
    # Readahead of the whole DMA range while the workload runs: with none, the read-back of
    # a refresh is 256 synchronous 4 KiB reads, and while they last (about 1.3 s under TCG
    # with the disk on vhost-user, 0.35 s on QEMU's own virtio-blk) the counter loop's
    # O_DIRECT writes to the same device wait too: the heartbeats stopped for that long at
    # every refresh. At the end none (below).
    blockdev --setra "$MIGRATE_DMA_RA_SECTORS" "$DISK" || fail setra_failed
    # Linux drops a block device's page cache when its last opener closes it: this shell
    # holds it open, so the pages read between two dd runs stay cached.
    exec 3<"$DISK"
    check_range "$OFF" $((len + MIGRATE_DMA_BYTES))
    result "duration_s=$ARG"
    fill=0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/
    while [ "${#fill}" -lt "$BLOCK_SIZE" ]; do fill=$fill$fill; done
    # header (28 bytes) + FILL + newline = BLOCK_SIZE
    FILL=$(printf '%.4067s' "$fill")
    migrate_region 0 >/tmp/expect
    write_at /tmp/expect "$OFF" || fail write_failed
    dd if=/dev/urandom of=/tmp/mem_src bs=$MIB count=$MIGRATE_MEM_MIB status=none ||
        fail datagen_failed
    cp /tmp/mem_src /tmp/mem_dst || fail datagen_failed
    migrate_memory_loop &
    mem_pid=$!
    renice -n "$MIGRATE_MEM_NICE" -p "$mem_pid" >/dev/null || fail renice_failed
    migrate_dma_loop &
    dma_pid=$!
    renice -n "$MIGRATE_DMA_NICE" -p "$dma_pid" >/dev/null || fail renice_failed

    migrate_count

    touch /tmp/mem_stop
    wait "$mem_pid"
    wait "$dma_pid"
    read -r dma_refreshes md5_dma </tmp/dma_state || fail dma_state_missing
    # Through the page cache, as the backend left it: after a migration these are the
    # destination's copies of pages only the backend wrote.
    dma_ok=0 dma_from_cache=0
    if [ "$dma_refreshes" -gt 0 ]; then
        # No readahead now: a buffered read fetches exactly the pages asked for, so the
        # disk's counters tell whether the cache served it.
        blockdev --setra 0 "$DISK" || fail setra_failed
        before=$(sectors_read)
        got=$(dd if="$DISK" bs="$MIGRATE_DMA_BYTES" iflag=skip_bytes skip="$DMA_OFF" count=1 \
            status=none | md5sum | cut -d' ' -f1) || fail read_failed
        [ "$(sectors_read)" != "$before" ] || dma_from_cache=1
        [ "$got" != "$md5_dma" ] || dma_ok=1
    fi
    drop_caches
    dd if="$DISK" of=/tmp/region bs=$MIB iflag=direct,skip_bytes,count_bytes skip="$OFF" \
        count="$len" status=none || fail read_failed
    md5_region=$(md5_file /tmp/region)
    migrate_region "$i" >/tmp/expect
    bad=$(migrate_bad_blocks 2>/tmp/diag)
    sed 's/^/STRAIT-DIAG /' /tmp/diag
    # Everything the host needs to check the region is printed here, at the end: after a
    # migration only these lines are on the destination's console.
    result "offset=$OFF length=$len block_size=$BLOCK_SIZE mem_copies=$(cat /tmp/mem_copies)" \
        "end_uptime_s=$up"
    result "migrate_iterations=$i blocks_checked=$MIGRATE_BLOCKS blocks_bad=$bad" \
        "md5_region=$md5_region"
    result "dma_offset=$DMA_OFF dma_refreshes=$dma_refreshes md5_dma=${md5_dma:-none}" \
        "dma_ok=$dma_ok dma_from_cache=$dma_from_cache"
    [ "$bad" = 0 ] || fail region_mismatch
    [ "$dma_refreshes" = 0 ] || [ "$dma_ok" = 1 ] || fail dma_mismatch
    pass
}

TEST=$(param test)
ARG=$(param arg)
OFF=$(param off)
OFF=${OFF:-$MIB}
result "test=${TEST:-none} kernel=$(uname -r) boot_uptime_s=$(cut -d' ' -f1 /proc/uptime)"

ARG_MAX=$ARG_MIB_MAX
case "$TEST" in
rw | verify) ARG=${ARG:-8} ;;
discard) ARG=${ARG:-4} ;;
migrate) ARG=${ARG:-60} ARG_MAX=$MIGRATE_SECONDS_MAX ;;
*) ARG=${ARG:-1} ;;
esac
case "$ARG" in
'' | *[!0-9]*) fail bad_arg ;;
esac
if [ "$ARG" -lt 1 ] || [ "$ARG" -gt "$ARG_MAX" ]; then
    fail arg_out_of_range
fi
ARG_MIB=$ARG
case "$OFF" in
'' | *[!0-9]*) fail bad_off ;;
esac
[ $((OFF % 4096)) -eq 0 ] || fail off_not_4k_aligned

load_modules
wait_disk
result "disk=ready disk_uptime_s=$(cut -d' ' -f1 /proc/uptime)"

case "$TEST" in
rw) scenario_rw ;;
flush) scenario_flush ;;
discard) scenario_discard ;;
ro) scenario_ro ;;
info) scenario_info ;;
verify) scenario_verify ;;
migrate) scenario_migrate ;;
*) fail "unknown_test_${TEST:-none}" ;;
esac
# Every scenario ends in pass or fail; reaching here is a bug in this script.
# shellcheck disable=SC2317
fail scenario_returned
