//! The engine-to-engine link across the WAN.
//!
//! Two strait engines, on hosts that share nothing, talk over a wide-area link of about
//! 1 Gbit/s with 100–250 ms of round-trip time that sometimes drops. This crate will hold:
//!
//! - the session: several parallel kernel-TCP connections striped by one session, sized to
//!   the measured bandwidth-delay product, mutually authenticated with TLS 1.3;
//! - framing with a fixed-layout header, a per-class sequence number and a CRC32C, narrated
//!   in `protocol.rs`;
//! - stream classes (`control`, `mirror`, `memory`, `bulk`) with priorities, weights and
//!   credit-based flow control granted by what the receiver can really apply;
//! - resumable sessions with a bounded retransmit buffer, so a link that drops and returns
//!   loses and duplicates nothing;
//! - the WAN emulator (`strait wanem`) and a deterministic in-process link for simulation.
//!
//! The link issue builds it module by module: [`protocol`] (framing and handshake), [`tls`]
//! (certificates and mutual TLS), [`wanem`] (the WAN emulator), [`sim`] (the deterministic
//! in-process link).

pub mod protocol;
pub mod session;
pub mod sim;
pub mod tls;
pub mod wanem;

/// An error and its chain of causes on one line, `outer: cause: root cause`, for logs and
/// status fields that show one string.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// The traffic classes the link will multiplex, highest priority first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamClass {
    /// Session control: handshakes, credits, checkpoints, switchover.
    Control,
    /// Guest writes in flight (asynchronous write mirroring).
    Mirror,
    /// The VM's memory and device-state stream during a live migration.
    Memory,
    /// Background copy of the whole disk.
    Bulk,
}

impl StreamClass {
    /// Every class, in priority order.
    pub const ALL: [StreamClass; 4] = [
        StreamClass::Control,
        StreamClass::Mirror,
        StreamClass::Memory,
        StreamClass::Bulk,
    ];

    /// The name used in logs, metrics and the control API.
    pub fn name(self) -> &'static str {
        match self {
            StreamClass::Control => "control",
            StreamClass::Mirror => "mirror",
            StreamClass::Memory => "memory",
            StreamClass::Bulk => "bulk",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_are_distinct_and_ordered() {
        let names: Vec<_> = StreamClass::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names, ["control", "mirror", "memory", "bulk"]);
    }
}
