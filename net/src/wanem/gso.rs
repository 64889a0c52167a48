//! Segmentation offload on the TUN devices.
//!
//! Moving 1 Gbit/s as 1500-byte packets costs a read, a write and a pass through the
//! receiving TCP stack for each of 83,000 packets a second, most of a core on this kind of
//! machine. So the devices are opened with a virtio-net header and TCP segmentation
//! offload (TSO): the sending kernel hands the forwarder TCP super-packets of up to 64 KiB
//! (with the segment size in the header), and the receiving kernel accepts them whole, as
//! it accepts GRO-merged packets from a real NIC.
//!
//! The emulated path still works on wire packets: a super-packet is admitted segment by
//! segment (each is serialised, can be lost or tail-dropped, and gets its own jitter). If
//! every segment survives, the super-packet is delivered whole when its last segment is
//! due; if some are dropped, the survivors are cut out here into ordinary IPv4/TCP packets
//! with full checksums. Only IPv4/TCP is offloaded (the devices do not offer IPv6 or UDP
//! segmentation), so the kernel segments anything else itself.

use zerocopy::byteorder::native_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of the legacy virtio-net header that precedes every packet on the devices.
pub(crate) const VNET_HDR_BYTES: usize = 10;

/// The largest frame a device hands over: the header plus the largest IPv4 packet, which
/// also bounds a TSO super-packet.
pub(crate) const FRAME_BYTES_MAX: usize = VNET_HDR_BYTES + 65_535;

/// `gso_type` of a TCP over IPv4 super-packet.
const GSO_TCPV4: u8 = 1;

/// `struct virtio_net_hdr`, in the host's byte order (the TUN default).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct VnetHeader {
    flags: u8,
    gso_type: u8,
    hdr_len: U16,
    gso_size: U16,
    csum_start: U16,
    csum_offset: U16,
}

const _: () = assert!(std::mem::size_of::<VnetHeader>() == VNET_HDR_BYTES);

/// How a frame read from a device splits into wire packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// One wire packet of this many bytes.
    Single { wire_bytes: usize },
    /// An IPv4/TCP super-packet.
    Tcp4(Tcp4Plan),
}

/// Where the parts of an IPv4/TCP super-packet are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tcp4Plan {
    ip_header_bytes: usize,
    /// IP plus TCP header; every segment repeats them.
    headers_bytes: usize,
    /// Payload bytes of every segment but the last.
    segment_payload_bytes: usize,
    /// Invariant: at least 1.
    payload_bytes: usize,
}

impl Plan {
    /// Reads the plan of `frame` (virtio-net header followed by the IP packet). A frame
    /// that does not parse as an IPv4/TCP super-packet is a single packet: the kernel only
    /// hands over what it could send as is.
    pub(crate) fn of(frame: &[u8]) -> Plan {
        let single = Plan::Single {
            wire_bytes: frame.len().saturating_sub(VNET_HDR_BYTES),
        };
        let Ok((header, packet)) = VnetHeader::read_from_prefix(frame) else {
            return single;
        };
        if header.gso_type != GSO_TCPV4 {
            return single;
        }
        match Tcp4Plan::parse(packet, usize::from(header.gso_size.get())) {
            Some(plan) => Plan::Tcp4(plan),
            None => single,
        }
    }

    /// How many wire packets the frame stands for.
    pub(crate) fn count(&self) -> usize {
        match self {
            Plan::Single { .. } => 1,
            Plan::Tcp4(plan) => plan.payload_bytes.div_ceil(plan.segment_payload_bytes),
        }
    }

    /// The size on the wire of packet `index` (below `count()`).
    pub(crate) fn wire_bytes(&self, index: usize) -> usize {
        match self {
            Plan::Single { wire_bytes } => *wire_bytes,
            Plan::Tcp4(plan) => plan.headers_bytes + plan.payload_range(index).len(),
        }
    }
}

impl Tcp4Plan {
    fn parse(packet: &[u8], segment_payload_bytes: usize) -> Option<Tcp4Plan> {
        const IPV4_HEADER_BYTES_MIN: usize = 20;
        const TCP_HEADER_BYTES_MIN: usize = 20;
        const PROTOCOL_TCP: u8 = 6;
        let first = *packet.first()?;
        let ip_header_bytes = usize::from(first & 0x0f) * 4;
        if first >> 4 != 4 || ip_header_bytes < IPV4_HEADER_BYTES_MIN {
            return None;
        }
        if *packet.get(9)? != PROTOCOL_TCP {
            return None;
        }
        let tcp_header_bytes = usize::from(*packet.get(ip_header_bytes + 12)? >> 4) * 4;
        if tcp_header_bytes < TCP_HEADER_BYTES_MIN {
            return None;
        }
        let headers_bytes = ip_header_bytes + tcp_header_bytes;
        let payload_bytes = packet.len().checked_sub(headers_bytes)?;
        if payload_bytes == 0 || segment_payload_bytes == 0 {
            return None;
        }
        Some(Tcp4Plan {
            ip_header_bytes,
            headers_bytes,
            segment_payload_bytes,
            payload_bytes,
        })
    }

    fn payload_range(&self, index: usize) -> std::ops::Range<usize> {
        let start = (index * self.segment_payload_bytes).min(self.payload_bytes);
        let end = (start + self.segment_payload_bytes).min(self.payload_bytes);
        start..end
    }

    /// Builds wire packet `index` of the super-packet in `frame` as a frame of its own: an
    /// empty virtio-net header (checksums complete, no offload) and an IPv4/TCP packet
    /// whose length, IP id, sequence number, flags and checksums are those the sending
    /// kernel's segmentation would have produced.
    pub(crate) fn segment(&self, frame: &[u8], index: usize) -> Vec<u8> {
        let packet = &frame[VNET_HDR_BYTES..];
        let count = self.payload_bytes.div_ceil(self.segment_payload_bytes);
        let payload = self.payload_range(index);
        let headers = &packet[..self.headers_bytes];
        let ip = self.ip_header_bytes;
        let mut out = Vec::with_capacity(VNET_HDR_BYTES + self.headers_bytes + payload.len());
        out.extend_from_slice(VnetHeader::default().as_bytes());
        out.extend_from_slice(headers);
        out.extend_from_slice(&packet[self.headers_bytes + payload.start..][..payload.len()]);
        let seg = &mut out[VNET_HDR_BYTES..];
        let total_len = u16::try_from(self.headers_bytes + payload.len()).unwrap_or(u16::MAX);
        seg[2..4].copy_from_slice(&total_len.to_be_bytes());
        let ip_id = u16::from_be_bytes([seg[4], seg[5]]).wrapping_add(index as u16);
        seg[4..6].copy_from_slice(&ip_id.to_be_bytes());
        seg[10..12].fill(0);
        let ip_checksum = checksum_finish(checksum_add(0, &seg[..ip]));
        seg[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
        let seq = u32::from_be_bytes([seg[ip + 4], seg[ip + 5], seg[ip + 6], seg[ip + 7]])
            .wrapping_add(payload.start as u32);
        seg[ip + 4..ip + 8].copy_from_slice(&seq.to_be_bytes());
        const FIN: u8 = 0x01;
        const PSH: u8 = 0x08;
        const CWR: u8 = 0x80;
        if index + 1 != count {
            seg[ip + 13] &= !(FIN | PSH);
        }
        if index != 0 {
            seg[ip + 13] &= !CWR;
        }
        seg[ip + 16..ip + 18].fill(0);
        let tcp_len = seg.len() - ip;
        let mut sum = checksum_add(0, &seg[12..20]); // source and destination address
        sum = checksum_add(sum, &[0, 6]);
        sum = checksum_add(sum, &(tcp_len as u16).to_be_bytes());
        sum = checksum_add(sum, &seg[ip..]);
        let tcp_checksum = checksum_finish(sum);
        seg[ip + 16..ip + 18].copy_from_slice(&tcp_checksum.to_be_bytes());
        out
    }
}

/// Adds `bytes` (as big-endian 16-bit words, an odd tail padded with zero) to the
/// ones'-complement running sum `sum`. Only whole headers or a final payload are added,
/// so an odd length only ever occurs at the very end.
fn checksum_add(mut sum: u64, bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(2);
    for word in &mut words {
        sum += u64::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

fn checksum_finish(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TSO frame as the kernel would hand it over: 3 full segments of 1000 and one of 500.
    fn super_packet(flags: u8) -> Vec<u8> {
        let payload: Vec<u8> = (0..3500u32).map(|i| (i * 7 % 251) as u8).collect();
        let header = VnetHeader {
            flags: 1,
            gso_type: GSO_TCPV4,
            hdr_len: U16::new(52),
            gso_size: U16::new(1000),
            csum_start: U16::new(20),
            csum_offset: U16::new(16),
        };
        let mut frame = header.as_bytes().to_vec();
        let total = 20 + 32 + payload.len();
        let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0];
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip.extend_from_slice(&[10, 213, 0, 1, 10, 213, 0, 2]);
        frame.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 32];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&0xffff_fc00u32.to_be_bytes()); // wraps inside the packet
        tcp[12] = 8 << 4;
        tcp[13] = flags;
        frame.extend_from_slice(&tcp);
        frame.extend_from_slice(&payload);
        frame
    }

    fn verify(sum: u64) -> bool {
        checksum_finish(sum) == 0
    }

    #[test]
    fn plans_a_super_packet() {
        let frame = super_packet(0x18);
        let plan = Plan::of(&frame);
        assert_eq!(plan.count(), 4);
        assert_eq!(plan.wire_bytes(0), 1052);
        assert_eq!(plan.wire_bytes(3), 552);
        let total: usize = (0..plan.count()).map(|i| plan.wire_bytes(i)).sum();
        assert_eq!(total, frame.len() - VNET_HDR_BYTES + 3 * 52);
    }

    #[test]
    fn segments_are_valid_packets_that_rebuild_the_stream() {
        let frame = super_packet(0x18 | 0x80 | 0x01); // ACK PSH CWR FIN
        let Plan::Tcp4(plan) = Plan::of(&frame) else {
            panic!("not a super-packet")
        };
        let mut payload = Vec::new();
        for index in 0..4 {
            let out = plan.segment(&frame, index);
            assert!(out[..VNET_HDR_BYTES].iter().all(|&b| b == 0));
            let seg = &out[VNET_HDR_BYTES..];
            assert_eq!(usize::from(u16::from_be_bytes([seg[2], seg[3]])), seg.len());
            assert_eq!(u16::from_be_bytes([seg[4], seg[5]]), 0x1234 + index as u16);
            assert!(
                verify(checksum_add(0, &seg[..20])),
                "IP checksum of {index}"
            );
            let mut pseudo = checksum_add(0, &seg[12..20]);
            pseudo = checksum_add(pseudo, &[0, 6]);
            pseudo = checksum_add(pseudo, &((seg.len() - 20) as u16).to_be_bytes());
            assert!(
                verify(checksum_add(pseudo, &seg[20..])),
                "TCP checksum of {index}"
            );
            let seq = u32::from_be_bytes([seg[24], seg[25], seg[26], seg[27]]);
            assert_eq!(seq, 0xffff_fc00u32.wrapping_add(index as u32 * 1000));
            let flags = seg[33];
            assert_eq!(flags & 0x80 != 0, index == 0, "CWR only on the first");
            assert_eq!(
                flags & 0x09 != 0,
                index == 3,
                "FIN and PSH only on the last"
            );
            payload.extend_from_slice(&seg[52..]);
        }
        assert_eq!(payload, frame[VNET_HDR_BYTES + 52..]);
    }

    #[test]
    fn anything_else_is_a_single_packet() {
        let mut frame = super_packet(0x10);
        frame[1] = 0; // gso_type NONE
        assert_eq!(
            Plan::of(&frame),
            Plan::Single {
                wire_bytes: frame.len() - VNET_HDR_BYTES
            }
        );
        let mut udp = super_packet(0x10);
        udp[VNET_HDR_BYTES + 9] = 17;
        assert_eq!(Plan::of(&udp).count(), 1);
        assert_eq!(Plan::of(&[1, 2, 3]).count(), 1);
        let mut truncated = super_packet(0x10);
        truncated.truncate(VNET_HDR_BYTES + 52);
        assert_eq!(Plan::of(&truncated).count(), 1);
    }
}
