//! The `migrate` scenario as the host sees it: the guest's heartbeat lines, the gaps between
//! them (the downtime a migrated guest saw), and the bytes its disk region must hold.
//!
//! The guest counts i = 1, 2, 3, ...; each step writes one 4 KiB block of a 4 MiB region and
//! then prints `STRAIT-HB i=<i> up=<uptime s>` (see `scripts/guest/init.sh`). The counter
//! lives in guest memory, so after a live migration the heartbeats go on, on the destination
//! QEMU's console; the host-side arrival times of the source's last line and the
//! destination's first bound the pause the guest went through.

use std::time::{Duration, Instant};

use super::qemu::Qemu;

/// The size of one block of the region; the guest writes one per heartbeat.
pub const MIGRATE_BLOCK_SIZE_BYTES: u64 = 4096;
/// Blocks in the region: step i writes block `i % MIGRATE_REGION_BLOCKS`.
pub const MIGRATE_REGION_BLOCKS: u64 = 1024;
/// 4 MiB, at `strait.off` (1 MiB unless set).
pub const MIGRATE_REGION_BYTES: u64 = MIGRATE_BLOCK_SIZE_BYTES * MIGRATE_REGION_BLOCKS;
/// The guest's default `strait.off`.
pub const MIGRATE_REGION_OFFSET_DEFAULT: u64 = 1 << 20;

const HEARTBEAT_MARKER: &str = "STRAIT-HB ";
/// Each block's text header, then the filler: this pattern repeated, cut to fill the block.
const BLOCK_HEADER_PREFIX: &str = "strait-migrate i=";
const FILLER_PATTERN: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/";
/// The counter is left-aligned in this many columns, so every header has the same length.
const BLOCK_COUNTER_COLUMNS: usize = 10;

/// One `STRAIT-HB` line: the guest has written block `i` and says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub i: u64,
    /// The guest's `/proc/uptime` after the write (it has two decimals).
    pub guest_uptime_ms: u64,
}

/// A heartbeat and when its line reached the host (recorded by the console reader thread).
#[derive(Clone, Copy, Debug)]
pub struct HeartbeatArrival {
    pub heartbeat: Heartbeat,
    pub arrived: Instant,
}

/// The longest host-side silence between two consecutive heartbeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatGap {
    pub gap: Duration,
    /// The heartbeat before the silence and the one that ended it.
    pub before_i: u64,
    pub after_i: u64,
}

/// Parses a heartbeat line; `None` for any other line. Strict, because the last line a source
/// QEMU prints may be cut short by the migration (its rest then appears on the destination):
/// the uptime must have its two decimals, and nothing may follow it.
pub fn parse_heartbeat(line: &str) -> Option<Heartbeat> {
    let line = line.trim_end();
    // A kernel message can share the serial line, before the marker.
    let at = line.find(HEARTBEAT_MARKER)?;
    let rest = &line[at + HEARTBEAT_MARKER.len()..];
    let (i, up) = rest.strip_prefix("i=")?.split_once(" up=")?;
    let (seconds, hundredths) = up.split_once('.')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(i) || !all_digits(seconds) || hundredths.len() != 2 || !all_digits(hundredths) {
        return None;
    }
    let guest_uptime_ms = seconds
        .parse::<u64>()
        .ok()?
        .checked_mul(1000)?
        .checked_add(hundredths.parse::<u64>().ok()? * 10)?;
    Some(Heartbeat {
        i: i.parse().ok()?,
        guest_uptime_ms,
    })
}

/// The heartbeats in a console transcript, in order.
pub fn heartbeats(console: &str) -> Vec<Heartbeat> {
    console.lines().filter_map(parse_heartbeat).collect()
}

/// The largest gap between consecutive arrivals (which must be in arrival order); `None`
/// with fewer than two.
pub fn largest_heartbeat_gap(arrivals: &[HeartbeatArrival]) -> Option<HeartbeatGap> {
    arrivals
        .windows(2)
        .map(|pair| HeartbeatGap {
            gap: pair[1].arrived.saturating_duration_since(pair[0].arrived),
            before_i: pair[0].heartbeat.i,
            after_i: pair[1].heartbeat.i,
        })
        .max_by_key(|gap| gap.gap)
}

/// The guest-side downtime of a migration from `source` to `destination`: the largest gap
/// between consecutive heartbeats of both consoles merged by host arrival time (the
/// switchover gap, from the source's last heartbeat to the destination's first, unless the
/// guest stalled longer elsewhere, e.g. throttled by auto-converge), with the last `i` the
/// source printed and the first the destination printed (the next one, if the counter went on
/// without a hitch). `None` unless both printed a heartbeat.
pub fn downtime_from_heartbeats(source: &Qemu, destination: &Qemu) -> Option<(Duration, u64, u64)> {
    let mut merged = source.heartbeat_arrivals();
    let last_on_source = merged.last()?.heartbeat.i;
    let on_destination = destination.heartbeat_arrivals();
    let first_on_destination = on_destination.first()?.heartbeat.i;
    merged.extend(on_destination);
    merged.sort_by_key(|arrival| arrival.arrived);
    let gap = largest_heartbeat_gap(&merged)?;
    Some((gap.gap, last_on_source, first_on_destination))
}

/// The 4 KiB block holding counter `counter`: `strait-migrate i=<counter>` left-aligned in
/// its columns, a newline, the filler, a newline.
pub fn migrate_block(counter: u64) -> Vec<u8> {
    let mut block = format!(
        "{BLOCK_HEADER_PREFIX}{counter:<width$}\n",
        width = BLOCK_COUNTER_COLUMNS
    )
    .into_bytes();
    let filler_len = MIGRATE_BLOCK_SIZE_BYTES as usize - block.len() - 1;
    block.extend(FILLER_PATTERN.iter().cycle().take(filler_len));
    block.push(b'\n');
    block
}

/// What the region must hold once the guest's counter reached `iterations`: block b holds
/// the last i <= iterations with i % 1024 == b, or 0 (the guest fills the region with
/// counter 0 before it starts counting).
pub fn migrate_region(iterations: u64) -> Vec<u8> {
    let mut region = Vec::with_capacity(MIGRATE_REGION_BYTES as usize);
    for block in 0..MIGRATE_REGION_BLOCKS {
        let counter = if iterations < block {
            0
        } else {
            block + (iterations - block) / MIGRATE_REGION_BLOCKS * MIGRATE_REGION_BLOCKS
        };
        region.extend(migrate_block(counter));
    }
    region
}
