//! The TCP socket options the link sets and reads: the send buffer, `TCP_NOTSENT_LOWAT`,
//! the congestion control, and what `TCP_INFO` says is on the network.

use std::io;
use std::net::TcpStream;

use tracing::debug;

use super::wire_bound::WireInfo;
use super::{CONN_WIRE_BYTES_MAX, NOTSENT_LOWAT_BYTES};

/// Where Linux keeps the send-buffer autotuning bounds: "min default max" in bytes.
const TCP_WMEM_PATH: &str = "/proc/sys/net/ipv4/tcp_wmem";

/// Sizes the socket's send buffer to what the session keeps on the network on a
/// connection, and sets `TCP_NOTSENT_LOWAT` ([`NOTSENT_LOWAT_BYTES`]).
///
/// Decision, from the kernel this runs on (6.18; `net.core.{r,w}mem_max` = 4 MiB and
/// read-only inside network namespaces, `tcp_rmem` max 32 MiB, `tcp_wmem` max 4 MiB):
///
/// - Receive: never set. An explicit `SO_RCVBUF` is clamped to `rmem_max` (doubled by
///   the kernel: 8 MiB measured) and turns autotuning off, while autotuning alone grows
///   to `tcp_rmem`'s 32 MiB, a whole 1 Gbit/s × 250 ms BDP on one connection.
/// - Send: set only when autotuning's ceiling (`tcp_wmem` max, 4 MiB here) is below
///   [`CONN_WIRE_BYTES_MAX`] (10 MiB). Asking for half of it gets up to 8 MiB
///   (measured: `SO_SNDBUF` 4 MiB reads back 8 MiB; the kernel doubles for its
///   bookkeeping, and clamps at `wmem_max`), twice what autotuning reaches. Where
///   `tcp_wmem` is already larger, setting it would only cap autotuning, so it is left
///   alone; an operator who wants the full rate at 200 ms raises `tcp_wmem` (docs/link.md).
///
/// The connection count does the rest (see [`crate::session::SessionConfig::connections_grow_max`]).
/// Best effort: a failure leaves the kernel's default, which only costs throughput.
pub(super) fn size_send_buffer(sock: &TcpStream) {
    let autotune_max_bytes = std::fs::read_to_string(TCP_WMEM_PATH)
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse::<u64>().ok());
    if autotune_max_bytes.is_none_or(|max| max < CONN_WIRE_BYTES_MAX) {
        let requested = CONN_WIRE_BYTES_MAX / 2;
        if let Err(error) = set_int_option(sock, libc::SOL_SOCKET, libc::SO_SNDBUF, requested) {
            debug!(%error, "could not size the send buffer");
        }
    }
    let lowat = NOTSENT_LOWAT_BYTES;
    if let Err(error) = set_int_option(sock, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, lowat) {
        debug!(%error, "could not set TCP_NOTSENT_LOWAT");
    }
}

/// What `TCP_INFO` says about the connection: the bytes it has on the network or waiting
/// to be sent (segments in flight, that is sent and neither acknowledged, selectively
/// acknowledged nor marked lost, plus retransmissions, times the MSS, plus the bytes not
/// yet sent), its delivery rate and its lowest RTT. `None` if `TCP_INFO` fails.
pub(super) fn wire_info(sock: &TcpStream) -> Option<WireInfo> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain old data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is a live socket owned by `sock`; `info` is writable for `len` bytes
    // and the kernel writes at most `len` bytes and updates it. A kernel whose struct is
    // shorter leaves the later fields (delivery rate, minimum RTT) zero, which the bound
    // reads as "not measured".
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    let segs = u64::from(info.tcpi_unacked)
        .saturating_sub(u64::from(info.tcpi_sacked) + u64::from(info.tcpi_lost))
        + u64::from(info.tcpi_retrans);
    Some(WireInfo {
        bytes: segs * u64::from(info.tcpi_snd_mss) + u64::from(info.tcpi_notsent_bytes),
        delivery_rate_bytes_per_s: info.tcpi_delivery_rate,
        min_rtt_us: info.tcpi_min_rtt,
    })
}

/// The longest congestion-control name the kernel knows (`TCP_CA_NAME_MAX`).
const CA_NAME_MAX: usize = 16;

/// The congestion control of the connection (`TCP_CONGESTION`), such as "bbr".
pub(super) fn congestion_control(sock: &TcpStream) -> io::Result<String> {
    use std::os::fd::AsRawFd;
    let mut name = [0u8; CA_NAME_MAX];
    let mut len = CA_NAME_MAX as libc::socklen_t;
    // SAFETY: the fd is a live socket owned by `sock`; `name` is writable for `len` bytes,
    // and the kernel writes at most `len` bytes and updates it.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = (len as usize).min(CA_NAME_MAX);
    let name = &name[..len];
    let end = name.iter().position(|b| *b == 0).unwrap_or(len);
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// Switches the connection's congestion control (`TCP_CONGESTION`); the kernel allows it
/// on an established connection, keeping its window.
pub(super) fn set_congestion_control(sock: &TcpStream, name: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if name.is_empty() || name.len() >= CA_NAME_MAX {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: the fd is a live socket owned by `sock`; the value points at `name.len()`
    // readable bytes, the length passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets an integer socket option; values above `c_int::MAX` are clamped to it.
fn set_int_option(
    sock: &TcpStream,
    level: libc::c_int,
    name: libc::c_int,
    value: u64,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: the fd is a live socket owned by `sock` for the whole call, and the option
    // value points at a c_int whose size is passed as the option length.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A connected loopback socket (its peer kept alive beside it).
    pub(crate) fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let sock = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (peer, _) = listener.accept().expect("accept");
        (sock, peer)
    }

    #[test]
    fn reads_and_switches_the_congestion_control() {
        let (sock, _peer) = connected();
        let own = congestion_control(&sock).expect("TCP_CONGESTION");
        assert!(!own.is_empty() && own.is_ascii(), "{own:?}");
        // reno is always built in; cubic is every distribution's default.
        for name in ["reno", "cubic", own.as_str()] {
            set_congestion_control(&sock, name).expect(name);
            assert_eq!(congestion_control(&sock).expect("read back"), name);
        }
    }

    #[test]
    fn refuses_a_congestion_control_that_does_not_exist() {
        let (sock, _peer) = connected();
        let own = congestion_control(&sock).expect("TCP_CONGESTION");
        assert!(set_congestion_control(&sock, "no-such-cc").is_err());
        assert!(set_congestion_control(&sock, "").is_err());
        assert!(set_congestion_control(&sock, "a-name-far-too-long-for-it").is_err());
        assert_eq!(congestion_control(&sock).expect("unchanged"), own);
    }
}
