//! How many bytes one connection may keep on the network: its share of the path's
//! bandwidth-delay product plus a little, not the fixed [`CONN_WIRE_BYTES_MAX`].
//!
//! Several BBR flows sharing one bottleneck each size their window to twice their own
//! bandwidth estimate times the RTT; together they hold about one bandwidth-delay product
//! in the bottleneck's queue, for as long as they run (measured with `ss -ti` during a
//! migration at 214 ms and 200 Mbit/s: every connection's RTT at 415–429 ms, about 15 MB
//! queued). Every byte queued there is a byte the last pages of a migration wait behind,
//! so the queue is downtime. A connection here keeps on the network at most
//! [`WIRE_GAIN_PERCENT`] of what it delivers in its lowest round trip: a connection
//! that delivers at rate `r` over a path of `min_rtt` needs `r × min_rtt` to keep its
//! pipe full, and the rest is the standing queue it may build, a quarter of the path's
//! RTT (54 ms at 214 ms) instead of all of it and the bytes waiting in its socket.
//!
//! The rate is the kernel's own measure (`tcpi_delivery_rate`), the largest over the last
//! [`RATE_WINDOW_NS`] so that one slow sample (an idle moment of the sender) does not
//! shrink the window, and the RTT its windowed minimum (`tcpi_min_rtt`). Bounded by the
//! window, the rate can still grow by the gain every round trip, which is how a
//! connection finds more bandwidth: from [`WIRE_FLOOR_BYTES`] each, four connections
//! fill 200 Mbit/s at 214 ms in about four round trips (a second).

use super::CONN_WIRE_BYTES_MAX;

/// The part of a connection's bandwidth-delay product it may keep on the network, in
/// percent: 100 keeps the pipe just full, the rest is the queue it may build and the room
/// to find more bandwidth (the rate grows by this factor per round trip). 125 is BBR's
/// own probing gain. Measured against 150 at 214 ms and 200 Mbit/s during a migration
/// (`bench/results/downtime-ab-580ae15-7608793.md`): the session's RTT at the stop 358 ms
/// against 443, the link's use the same (0.90–0.92).
pub const WIRE_GAIN_PERCENT: u64 = 125;

/// The least a connection may keep on the network whatever it measured: enough to start
/// (a fresh connection has no rate yet) and to keep a slow path busy, small enough that
/// the connections' floors together queue little on a slow path (four connections: 2 MiB,
/// 80 ms at 200 Mbit/s).
pub const WIRE_FLOOR_BYTES: u64 = 512 << 10;

/// How long a delivery-rate sample counts as the connection's rate: a few round trips at
/// the RTTs the link is built for (100–250 ms), so an idle moment does not shrink the
/// window while a rate that really fell is forgotten within a second.
pub const RATE_WINDOW_NS: u64 = 1_000_000_000;

const _: () = assert!(WIRE_FLOOR_BYTES <= CONN_WIRE_BYTES_MAX);
const _: () = assert!(WIRE_GAIN_PERCENT >= 100);

/// What `TCP_INFO` says about one connection, as far as the bound needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireInfo {
    /// Bytes on the network (in flight, neither acked nor lost, plus retransmissions) or
    /// not yet sent.
    pub bytes: u64,
    /// The kernel's latest delivery-rate sample, bytes per second; 0 before the first.
    pub delivery_rate_bytes_per_s: u64,
    /// The lowest RTT the kernel saw on the connection, microseconds; 0 before the first.
    pub min_rtt_us: u32,
}

/// One connection's bound, kept by its writer.
#[derive(Debug, Clone, Default)]
pub struct WireBound {
    /// The largest delivery rate of the current window and of the one before it: the rate
    /// counted is the larger of the two, so a sample is kept between one and two windows.
    rate_max: [u64; 2],
    /// When the current window began (ns on the caller's clock).
    window_start_ns: u64,
}

impl WireBound {
    /// A bound for a connection that has measured nothing yet.
    pub fn new() -> WireBound {
        WireBound::default()
    }

    /// Takes in a `TCP_INFO` reading made at `now_ns`, and returns the bytes the
    /// connection may keep on the network now.
    pub fn update(&mut self, now_ns: u64, info: &WireInfo) -> u64 {
        if now_ns.saturating_sub(self.window_start_ns) >= RATE_WINDOW_NS {
            self.rate_max = [0, self.rate_max[0]];
            self.window_start_ns = now_ns;
        }
        self.rate_max[0] = self.rate_max[0].max(info.delivery_rate_bytes_per_s);
        self.bound(info.min_rtt_us)
    }

    /// The bound for a path whose lowest RTT is `min_rtt_us`.
    fn bound(&self, min_rtt_us: u32) -> u64 {
        let rate = self.rate_max[0].max(self.rate_max[1]);
        if rate == 0 || min_rtt_us == 0 {
            return WIRE_FLOOR_BYTES;
        }
        // u128: a rate of up to 2^64 bytes/s times microseconds cannot overflow.
        let bdp = u128::from(rate) * u128::from(min_rtt_us) / 1_000_000;
        let bound = bdp * u128::from(WIRE_GAIN_PERCENT) / 100;
        u64::try_from(bound)
            .unwrap_or(u64::MAX)
            .clamp(WIRE_FLOOR_BYTES, CONN_WIRE_BYTES_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn info(rate: u64, min_rtt_ms: u32) -> WireInfo {
        WireInfo {
            bytes: 0,
            delivery_rate_bytes_per_s: rate,
            min_rtt_us: min_rtt_ms * 1000,
        }
    }

    #[test]
    fn a_connection_keeps_its_bandwidth_delay_product_and_the_gain() {
        let mut b = WireBound::new();
        // 6.25 MB/s (a quarter of 200 Mbit/s) over 214 ms: 1.3375 MB, times the gain.
        assert_eq!(
            b.update(0, &info(6_250_000, 214)),
            1_337_500 * WIRE_GAIN_PERCENT / 100
        );
    }

    #[test]
    fn nothing_measured_yet_is_the_floor() {
        let mut b = WireBound::new();
        assert_eq!(b.update(0, &WireInfo::default()), WIRE_FLOOR_BYTES);
        assert_eq!(b.update(1, &info(0, 214)), WIRE_FLOOR_BYTES);
        assert_eq!(b.update(2, &info(25_000_000, 0)), WIRE_FLOOR_BYTES);
        // A slow path: its product is below the floor.
        assert_eq!(
            WireBound::new().update(3, &info(100_000, 100)),
            WIRE_FLOOR_BYTES
        );
    }

    #[test]
    fn a_fast_path_is_capped_at_the_fixed_bound() {
        let mut b = WireBound::new();
        // 1 Gbit/s over 250 ms on one connection: 31 MB, above the fixed bound.
        assert_eq!(b.update(0, &info(125_000_000, 250)), CONN_WIRE_BYTES_MAX);
    }

    #[test]
    fn one_slow_sample_does_not_shrink_the_window_but_an_old_rate_is_forgotten() {
        let mut b = WireBound::new();
        let full = b.update(0, &info(10_000_000, 200));
        assert_eq!(full, 2_000_000 * WIRE_GAIN_PERCENT / 100);
        // An idle moment within the window, and in the next one: the peak still counts.
        assert_eq!(b.update(100 * MS, &info(1_000, 200)), full);
        assert_eq!(b.update(1_500 * MS, &info(1_000, 200)), full);
        // Two windows of the lower rate: it is the rate now.
        let low = b.update(2_600 * MS, &info(2_000_000, 200));
        assert_eq!(
            low,
            (400_000 * WIRE_GAIN_PERCENT / 100).max(WIRE_FLOOR_BYTES)
        );
    }

    #[test]
    fn the_window_grows_with_the_rate_it_allows() {
        // A connection held by its own bound delivers bound / min_rtt; each round trip the
        // bound grows by the gain until the path is full.
        let mut b = WireBound::new();
        let min_rtt_ms = 214u32;
        let path_bytes_per_s = 25_000_000u64;
        let mut bound = WIRE_FLOOR_BYTES;
        let mut now = 0;
        let mut round_trips = 0;
        while bound * 1000 / u64::from(min_rtt_ms) < path_bytes_per_s * 99 / 100 {
            let rate = (bound * 1000 / u64::from(min_rtt_ms)).min(path_bytes_per_s);
            now += u64::from(min_rtt_ms) * MS;
            let next = b.update(now, &info(rate, min_rtt_ms));
            assert!(next > bound, "the bound must grow: {bound} -> {next}");
            bound = next;
            round_trips += 1;
        }
        // One connection alone, 2.4 MB/s to 25 MB/s at 1.25x per round trip: 11 round
        // trips, 2.4 s; four connections sharing the path start from four floors and need
        // 5, about a second.
        assert!(round_trips <= 11, "{round_trips} round trips");
    }
}
