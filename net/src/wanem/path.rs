//! The emulated path of one direction, as a pure function of arrival times and sizes.
//!
//! A packet read from the sending namespace's TUN device meets, in this order:
//!
//! 1. the link cut: while the cut is on, every packet is lost;
//! 2. random loss, drawn from a seeded generator (one draw per packet, whatever happens to
//!    it, so the same seed and the same packet sequence give the same losses);
//! 3. the bottleneck: a link of `rate` bits per second that serialises one packet after the
//!    other, fed by a tail-drop queue of bounded size, like a router's output port;
//! 4. the propagation delay (half the round trip) plus jitter, clamped so that a packet is
//!    never released before the one ahead of it: the path does not reorder. When packets
//!    follow each other more closely than the jitter, the clamp makes most of them wait
//!    for the slowest one ahead, so dense traffic sees nearly the full jitter as extra
//!    delay and little variation: the price of keeping order.
//!
//! Time is in nanoseconds since the emulator's epoch. Nothing here reads a clock or
//! sleeps, so the model is tested exactly, without threads.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// Nanoseconds in a second.
pub(crate) const NS_PER_S: u64 = 1_000_000_000;

/// The bottleneck queue holds this many bandwidth-delay products. One BDP is the classic
/// router buffer rule (Villamizar and Song, 1994): enough for a single TCP flow to keep the
/// link busy after it halves its window on a loss, without adding more than one extra RTT
/// of queueing delay.
pub(crate) const QUEUE_BDP_MULTIPLE: u64 = 1;

/// The bottleneck queue never holds fewer bytes than 64 full-size packets, so that at a
/// small RTT (where the BDP is tiny) a TSO burst of 64 KiB from the sender is not tail
/// dropped at once; 64 packets is the depth of a shallow switch port buffer.
pub(crate) const QUEUE_BYTES_MIN: u64 = 64 * 1500;

/// What the path does with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Deliver the packet at `due_ns`, after `queue_delay_ns` spent waiting for the link.
    Release { due_ns: u64, queue_delay_ns: u64 },
    /// Lost to random loss.
    DropLoss,
    /// Tail-dropped: the bottleneck queue is full.
    DropQueue,
    /// The emulator's own delay line is full: its release thread has fallen behind (the
    /// forwarder is short of CPU). Not part of the emulated path; counted apart.
    DropOverload,
    /// Lost because the link is cut.
    DropCut,
}

/// The parameters of one direction, already converted to the model's units.
#[derive(Debug, Clone)]
pub(crate) struct PathParams {
    /// Propagation delay: half the round-trip time.
    pub(crate) one_way_ns: u64,
    /// Each packet gets an extra delay drawn uniformly from `0..=jitter_ns_max`.
    pub(crate) jitter_ns_max: u64,
    /// Bottleneck rate; 0 means no bottleneck (no serialisation, no queue).
    pub(crate) rate_bits_per_s: u64,
    /// Tail-drop limit of the bottleneck queue.
    pub(crate) queue_bytes_max: u64,
    /// Probability in `0.0..=1.0` that a packet is lost.
    pub(crate) loss_probability: f64,
    /// The link is cut during `start_ns..end_ns`.
    pub(crate) cut_ns: Option<(u64, u64)>,
    /// Seeds the loss and jitter generators.
    pub(crate) seed: u64,
}

impl PathParams {
    /// The queue limit for a bottleneck of `rate_bits_per_s` on a path of `rtt_ns`.
    pub(crate) fn queue_bytes_for(rate_bits_per_s: u64, rtt_ns: u64) -> u64 {
        let bdp_bytes = u128::from(rate_bits_per_s) * u128::from(rtt_ns) / 8 / u128::from(NS_PER_S);
        let bdp_bytes = u64::try_from(bdp_bytes).unwrap_or(u64::MAX);
        bdp_bytes
            .saturating_mul(QUEUE_BDP_MULTIPLE)
            .max(QUEUE_BYTES_MIN)
    }
}

/// The state of one direction.
pub(crate) struct Path {
    params: PathParams,
    loss_rng: ChaCha8Rng,
    jitter_rng: ChaCha8Rng,
    /// When the bottleneck finishes serialising the last accepted packet.
    /// Invariant: never decreases.
    link_free_ns: u64,
    /// Release time of the last accepted packet.
    /// Invariant: never decreases, so the delay line stays sorted by due time.
    release_last_ns: u64,
}

/// Separates the jitter stream from the loss stream of the same seed, so that turning
/// jitter on does not change which packets are lost.
const JITTER_STREAM: u64 = 1;

impl Path {
    pub(crate) fn new(params: PathParams) -> Path {
        let loss_rng = ChaCha8Rng::seed_from_u64(params.seed);
        let mut jitter_rng = ChaCha8Rng::seed_from_u64(params.seed);
        jitter_rng.set_stream(JITTER_STREAM);
        Path {
            params,
            loss_rng,
            jitter_rng,
            link_free_ns: 0,
            release_last_ns: 0,
        }
    }

    /// Decides the fate of a packet of `size_bytes` arriving at `now_ns`. `line_has_room`
    /// tells whether the delay line behind the path can take it.
    pub(crate) fn admit(&mut self, now_ns: u64, size_bytes: usize, line_has_room: bool) -> Verdict {
        // Drawn before any other decision so that loss depends only on the packet's index.
        let loss_draw = unit_interval(self.loss_rng.next_u64());
        if let Some((cut_start_ns, cut_end_ns)) = self.params.cut_ns {
            if (cut_start_ns..cut_end_ns).contains(&now_ns) {
                return Verdict::DropCut;
            }
        }
        if loss_draw < self.params.loss_probability {
            return Verdict::DropLoss;
        }
        if !line_has_room {
            return Verdict::DropOverload;
        }
        let size_bytes = u64::try_from(size_bytes).unwrap_or(u64::MAX);
        let (start_ns, finish_ns) = if self.params.rate_bits_per_s == 0 {
            (now_ns, now_ns)
        } else {
            let start_ns = now_ns.max(self.link_free_ns);
            let backlog_bytes =
                mul_div(start_ns - now_ns, self.params.rate_bits_per_s, 8 * NS_PER_S);
            if backlog_bytes.saturating_add(size_bytes) > self.params.queue_bytes_max {
                return Verdict::DropQueue;
            }
            let serialise_ns = mul_div(size_bytes, 8 * NS_PER_S, self.params.rate_bits_per_s);
            (start_ns, start_ns.saturating_add(serialise_ns))
        };
        self.link_free_ns = self.link_free_ns.max(finish_ns);
        let jitter_ns = self.draw_jitter_ns();
        let due_ns = finish_ns
            .saturating_add(self.params.one_way_ns)
            .saturating_add(jitter_ns)
            .max(self.release_last_ns);
        self.release_last_ns = due_ns;
        Verdict::Release {
            due_ns,
            queue_delay_ns: start_ns - now_ns,
        }
    }

    fn draw_jitter_ns(&mut self) -> u64 {
        if self.params.jitter_ns_max == 0 {
            return 0;
        }
        let span = u128::from(self.params.jitter_ns_max) + 1;
        // Multiply-shift maps a uniform u64 onto 0..span; the bias is below 2^-40 here.
        let scaled = (u128::from(self.jitter_rng.next_u64()) * span) >> 64;
        u64::try_from(scaled).unwrap_or(self.params.jitter_ns_max)
    }
}

/// Maps a uniform u64 onto `[0, 1)` with the 53 bits an f64 holds.
fn unit_interval(x: u64) -> f64 {
    const MANTISSA_BITS: u32 = 53;
    (x >> (64 - MANTISSA_BITS)) as f64 / (1u64 << MANTISSA_BITS) as f64
}

/// `a * b / c` without intermediate overflow, saturating.
fn mul_div(a: u64, b: u64, c: u64) -> u64 {
    if c == 0 {
        return u64::MAX;
    }
    u64::try_from(u128::from(a) * u128::from(b) / u128::from(c)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> PathParams {
        PathParams {
            one_way_ns: 50_000_000,
            jitter_ns_max: 0,
            rate_bits_per_s: 0,
            queue_bytes_max: QUEUE_BYTES_MIN,
            loss_probability: 0.0,
            cut_ns: None,
            seed: 7,
        }
    }

    #[test]
    fn unlimited_path_only_delays() {
        let mut path = Path::new(params());
        assert_eq!(
            path.admit(1_000, 1500, true),
            Verdict::Release {
                due_ns: 50_001_000,
                queue_delay_ns: 0
            }
        );
    }

    #[test]
    fn bottleneck_serialises_and_queues() {
        // 12 Mbit/s: a 1500-byte packet takes exactly 1 ms on the wire.
        let mut path = Path::new(PathParams {
            rate_bits_per_s: 12_000_000,
            ..params()
        });
        let first = path.admit(0, 1500, true);
        let second = path.admit(0, 1500, true);
        assert_eq!(
            first,
            Verdict::Release {
                due_ns: 51_000_000,
                queue_delay_ns: 0
            }
        );
        assert_eq!(
            second,
            Verdict::Release {
                due_ns: 52_000_000,
                queue_delay_ns: 1_000_000
            }
        );
    }

    #[test]
    fn full_queue_tail_drops_and_drains() {
        let mut path = Path::new(PathParams {
            rate_bits_per_s: 12_000_000,
            queue_bytes_max: 3000,
            ..params()
        });
        // The first two fill the queue (the first is on the wire, counted as backlog too).
        assert!(matches!(path.admit(0, 1500, true), Verdict::Release { .. }));
        assert!(matches!(path.admit(0, 1500, true), Verdict::Release { .. }));
        assert_eq!(path.admit(0, 1500, true), Verdict::DropQueue);
        // One millisecond later one packet has left the queue.
        assert!(matches!(
            path.admit(1_000_000, 1500, true),
            Verdict::Release { .. }
        ));
        assert_eq!(path.admit(1_000_000, 1500, true), Verdict::DropQueue);
    }

    #[test]
    fn jitter_never_reorders() {
        let mut path = Path::new(PathParams {
            jitter_ns_max: 20_000_000,
            ..params()
        });
        let mut last = 0;
        let mut spread = (u64::MAX, 0);
        // Spaced wider than the jitter, so the clamp rarely binds and the spread shows.
        for i in 0..10_000u64 {
            let now = i * 25_000_000;
            let Verdict::Release { due_ns, .. } = path.admit(now, 100, true) else {
                panic!("unexpected drop")
            };
            assert!(due_ns >= last, "packet {i} released before its predecessor");
            assert!(due_ns >= now + 50_000_000);
            assert!(due_ns <= now + 70_000_000);
            spread = (spread.0.min(due_ns - now), spread.1.max(due_ns - now));
            last = due_ns;
        }
        assert!(
            spread.1 - spread.0 > 15_000_000,
            "jitter too narrow: {spread:?}"
        );
    }

    #[test]
    fn loss_rate_and_determinism() {
        let lossy = PathParams {
            loss_probability: 0.05,
            ..params()
        };
        let count = |p: PathParams| {
            let mut path = Path::new(p);
            (0..100_000)
                .filter(|&i| path.admit(i, 100, true) == Verdict::DropLoss)
                .count()
        };
        let first = count(lossy.clone());
        assert_eq!(first, count(lossy.clone()));
        assert!((4_700..=5_300).contains(&first), "{first} losses in 100000");
        // Jitter draws come from their own stream and do not move the losses.
        let jittery = PathParams {
            jitter_ns_max: 1_000_000,
            ..lossy.clone()
        };
        assert_eq!(first, count(jittery));
        assert_ne!(first, count(PathParams { seed: 8, ..lossy }));
    }

    #[test]
    fn cut_drops_everything_inside_the_window() {
        let mut path = Path::new(PathParams {
            cut_ns: Some((1_000, 2_000)),
            ..params()
        });
        assert!(matches!(
            path.admit(999, 100, true),
            Verdict::Release { .. }
        ));
        assert_eq!(path.admit(1_000, 100, true), Verdict::DropCut);
        assert_eq!(path.admit(1_999, 100, true), Verdict::DropCut);
        assert!(matches!(
            path.admit(2_000, 100, true),
            Verdict::Release { .. }
        ));
    }

    #[test]
    fn full_delay_line_drops() {
        let mut path = Path::new(params());
        assert_eq!(path.admit(0, 100, false), Verdict::DropOverload);
    }

    #[test]
    fn queue_size_follows_the_bdp() {
        // 1 Gbit/s x 200 ms = 25 MB.
        assert_eq!(
            PathParams::queue_bytes_for(1_000_000_000, 200_000_000),
            25_000_000
        );
        assert_eq!(PathParams::queue_bytes_for(100_000_000, 0), QUEUE_BYTES_MIN);
    }
}
