//! Parsing and validating one virtio-blk request from a descriptor chain.
//!
//! The guest is hostile: every descriptor is checked (direction, length, bounds in guest
//! memory) and the whole chain is validated before any I/O is started. A request that fails
//! validation is answered with `VIRTIO_BLK_S_IOERR` (or `UNSUPP` for an unknown type) when
//! its status byte can be located, and completed with no status when it cannot.
//!
//! Framing (virtio 1.2, 5.2.6): a device-readable 16-byte header `{type: le32, reserved:
//! le32, sector: le64}`, then data descriptors (device-writable for reads and `GET_ID`,
//! device-readable for writes, discards and write-zeroes), then a device-writable status
//! byte. Like QEMU, Firecracker and Cloud Hypervisor we require the header in the first
//! descriptor and the status in the last one; Linux, Windows and SeaBIOS drivers frame it so.

use std::ops::Deref;

use smallvec::SmallVec;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::limits::{
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, MAX_REQUEST_BYTES, MAX_SEGMENTS, SECTOR_SHIFT,
    SECTOR_SIZE,
};

/// Size of the request header every chain starts with.
pub const HEADER_BYTES: u32 = 16;
/// Size of one discard / write-zeroes range record.
pub const DISCARD_RECORD_BYTES: u32 = 16;
/// The `unmap` flag of a write-zeroes record: the device may deallocate the range.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// The request header, as the guest lays it out.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RawHeader {
    request_type: u32,
    reserved: u32,
    sector: u64,
}

// SAFETY: RawHeader is repr(C), made of plain integers with no padding (4 + 4 + 8 bytes),
// so every bit pattern is a valid value.
unsafe impl ByteValued for RawHeader {}

/// One discard or write-zeroes range record.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RawDiscard {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}

// SAFETY: RawDiscard is repr(C), plain integers, no padding (8 + 4 + 4 bytes).
unsafe impl ByteValued for RawDiscard {}

/// What the guest asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    /// A request type this device does not implement; answered `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(u32),
}

impl RequestKind {
    fn from_raw(value: u32) -> RequestKind {
        match value {
            VIRTIO_BLK_T_IN => RequestKind::Read,
            VIRTIO_BLK_T_OUT => RequestKind::Write,
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            VIRTIO_BLK_T_DISCARD => RequestKind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestKind::WriteZeroes,
            other => RequestKind::Unsupported(other),
        }
    }

    /// Whether the request modifies the disk.
    pub fn is_mutation(self) -> bool {
        matches!(
            self,
            RequestKind::Write | RequestKind::Discard | RequestKind::WriteZeroes
        )
    }
}

/// A contiguous piece of guest memory a request reads from or writes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// One range of a discard or write-zeroes request, in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorRange {
    pub sector: u64,
    pub num_sectors: u32,
    /// Write-zeroes only: the device may deallocate the range.
    pub unmap: bool,
}

/// Data segments kept inline in a [`Request`]. Linux frames a 4 KiB request in one data
/// descriptor and a page-aligned 16 KiB one in at most four; longer scatter lists spill to
/// the heap.
pub const INLINE_SEGMENTS: usize = 4;

/// Descriptors a chain is collected into before validation, inline: header, the inline data
/// segments, status.
const INLINE_DESCRIPTORS: usize = INLINE_SEGMENTS + 2;

/// A request's data segments.
pub type Segments = SmallVec<[Segment; INLINE_SEGMENTS]>;

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub sector: u64,
    /// Data segments in chain order (empty for flush, unsupported types and discards, whose
    /// ranges are in `ranges`).
    pub segments: Segments,
    /// Sum of `segments` lengths.
    pub data_len: u32,
    /// Discard / write-zeroes ranges.
    pub ranges: Vec<SectorRange>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("descriptor chain is empty or broken (loop, bad index or bad indirect table)")]
    BrokenChain,
    #[error("descriptor chain has {0} descriptors, more than the {MAX_SEGMENTS} + 2 allowed")]
    TooManyDescriptors(usize),
    #[error("chain has no separate status descriptor")]
    NoStatus,
    #[error("status descriptor is not device-writable or is empty")]
    BadStatusDescriptor,
    #[error("descriptor at {addr:#x}+{len} lies outside guest memory")]
    OutOfGuestMemory { addr: u64, len: u32 },
    #[error("request header descriptor is device-writable or shorter than {HEADER_BYTES} bytes")]
    BadHeader,
    #[error("data descriptor has the wrong direction for this request type")]
    WrongDirection,
    #[error("data length {0} is not a whole number of 512-byte sectors")]
    NotSectorMultiple(u64),
    #[error("request carries {0} bytes, more than the {MAX_REQUEST_BYTES} allowed")]
    TooLarge(u64),
    #[error("discard/write-zeroes payload of {0} bytes is not a whole, bounded set of records")]
    BadRangeList(u64),
    #[error("discard/write-zeroes record has reserved flags {0:#x} set")]
    BadRangeFlags(u32),
    #[error(
        "discard/write-zeroes range of {0} sectors exceeds the {MAX_DISCARD_SECTORS} advertised"
    )]
    RangeTooLong(u32),
}

impl ParseError {
    /// Whether the spec wants `VIRTIO_BLK_S_UNSUPP` rather than `IOERR` for this rejection
    /// (virtio 1.2, 5.2.6.2: the unmap flag on a discard, or reserved flags).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, ParseError::BadRangeFlags(_))
    }
}

/// A rejected chain: the reason, and where to write the status byte if that is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    pub error: ParseError,
    pub status: Option<GuestAddress>,
}

fn check_bounds<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: u32,
    access: Permissions,
) -> Result<(), ParseError> {
    if mem.check_range(addr, len as usize, access) {
        Ok(())
    } else {
        Err(ParseError::OutOfGuestMemory { addr: addr.0, len })
    }
}

impl Request {
    /// Walks and validates a whole chain. Reads only the header and (for discards) the range
    /// list from guest memory; never writes to it.
    pub fn parse<M>(chain: &mut DescriptorChain<M>) -> Result<Request, Rejected>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut descriptors: SmallVec<[_; INLINE_DESCRIPTORS]> = SmallVec::new();
        let mut last_has_next = false;
        for desc in chain.by_ref() {
            if descriptors.len() == MAX_SEGMENTS + 2 {
                return Err(Rejected {
                    error: ParseError::TooManyDescriptors(descriptors.len() + 1),
                    status: None,
                });
            }
            last_has_next = desc.has_next();
            descriptors.push(desc);
        }
        // The iterator stops early on a broken link; a last descriptor that still claims a
        // successor means the chain was cut by an invalid index or a loop.
        if descriptors.is_empty() || last_has_next {
            return Err(Rejected {
                error: ParseError::BrokenChain,
                status: None,
            });
        }
        let mem = chain.memory();
        if descriptors.len() < 2 {
            return Err(Rejected {
                error: ParseError::NoStatus,
                status: None,
            });
        }

        let status_desc = descriptors[descriptors.len() - 1];
        if !status_desc.is_write_only() || status_desc.len() == 0 {
            return Err(Rejected {
                error: ParseError::BadStatusDescriptor,
                status: None,
            });
        }
        let status = status_desc.addr();
        check_bounds(mem, status, 1, Permissions::Write).map_err(|error| Rejected {
            error,
            status: None,
        })?;
        let reject = |error| Rejected {
            error,
            status: Some(status),
        };

        let header_desc = descriptors[0];
        if header_desc.is_write_only() || header_desc.len() < HEADER_BYTES {
            return Err(reject(ParseError::BadHeader));
        }
        check_bounds(mem, header_desc.addr(), HEADER_BYTES, Permissions::Read).map_err(reject)?;
        let header: RawHeader = mem
            .read_obj(header_desc.addr())
            .map_err(|_| reject(ParseError::BadHeader))?;
        let kind = RequestKind::from_raw(u32::from_le(header.request_type));
        let sector = u64::from_le(header.sector);

        let mut request = Request {
            kind,
            sector,
            segments: Segments::new(),
            data_len: 0,
            ranges: Vec::new(),
            status,
        };
        let data = &descriptors[1..descriptors.len() - 1];
        let device_writes = match kind {
            RequestKind::Read | RequestKind::GetId => true,
            RequestKind::Write | RequestKind::Discard | RequestKind::WriteZeroes => false,
            // Nothing is transferred; the data descriptors, if any, are ignored.
            RequestKind::Flush | RequestKind::Unsupported(_) => return Ok(request),
        };
        let mut total: u64 = 0;
        for desc in data {
            if desc.is_write_only() != device_writes {
                return Err(reject(ParseError::WrongDirection));
            }
            let access = if device_writes {
                Permissions::Write
            } else {
                Permissions::Read
            };
            check_bounds(mem, desc.addr(), desc.len(), access).map_err(reject)?;
            total += u64::from(desc.len());
            if total > MAX_REQUEST_BYTES {
                return Err(reject(ParseError::TooLarge(total)));
            }
            if desc.len() > 0 {
                request.segments.push(Segment {
                    addr: desc.addr(),
                    len: desc.len(),
                });
            }
        }
        // Bounded by MAX_REQUEST_BYTES just above, which fits in u32.
        request.data_len = total as u32;

        match kind {
            RequestKind::Read | RequestKind::Write if !total.is_multiple_of(SECTOR_SIZE) => {
                return Err(reject(ParseError::NotSectorMultiple(total)));
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                request.ranges = parse_ranges(mem, &request.segments, kind).map_err(reject)?;
                request.segments.clear();
            }
            _ => {}
        }
        Ok(request)
    }

    /// Checks that the request stays inside a disk of `capacity_sectors`.
    pub fn check_range(&self, capacity_sectors: u64) -> bool {
        let inside = |sector: u64, sectors: u64| {
            sector
                .checked_add(sectors)
                .is_some_and(|end| end <= capacity_sectors)
        };
        match self.kind {
            RequestKind::Read | RequestKind::Write => {
                inside(self.sector, u64::from(self.data_len) >> SECTOR_SHIFT)
            }
            RequestKind::Discard | RequestKind::WriteZeroes => self
                .ranges
                .iter()
                .all(|r| inside(r.sector, u64::from(r.num_sectors))),
            _ => true,
        }
    }
}

fn parse_ranges<M: GuestMemory + ?Sized>(
    mem: &M,
    segments: &[Segment],
    kind: RequestKind,
) -> Result<Vec<SectorRange>, ParseError> {
    let total: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
    let record = u64::from(DISCARD_RECORD_BYTES);
    if total == 0 || !total.is_multiple_of(record) || total / record > MAX_DISCARD_SEGMENTS as u64 {
        return Err(ParseError::BadRangeList(total));
    }
    // Gather the payload (at most MAX_DISCARD_SEGMENTS * 16 bytes) so a record may straddle
    // two descriptors, as the spec allows.
    let mut payload = vec![0u8; total as usize];
    let mut at = 0usize;
    for segment in segments {
        let end = at + segment.len as usize;
        mem.read_slice(&mut payload[at..end], segment.addr)
            .map_err(|_| ParseError::OutOfGuestMemory {
                addr: segment.addr.0,
                len: segment.len,
            })?;
        at = end;
    }
    let mut ranges = Vec::with_capacity(payload.len() / DISCARD_RECORD_BYTES as usize);
    for chunk in payload.chunks_exact(DISCARD_RECORD_BYTES as usize) {
        let mut raw = RawDiscard::default();
        raw.as_mut_slice().copy_from_slice(chunk);
        let flags = u32::from_le(raw.flags);
        let allowed = if kind == RequestKind::WriteZeroes {
            WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Err(ParseError::BadRangeFlags(flags));
        }
        let num_sectors = u32::from_le(raw.num_sectors);
        if num_sectors > MAX_DISCARD_SECTORS {
            return Err(ParseError::RangeTooLong(num_sectors));
        }
        ranges.push(SectorRange {
            sector: u64::from_le(raw.sector),
            num_sectors,
            unmap: flags & WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{QueueOwnedT, QueueT};
    use vm_memory::GuestMemoryMmap;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory")
    }

    /// Builds a chain from `(addr, len, device_writes)` and parses it.
    fn parse_chain(
        mem: &GuestMemoryMmap,
        header: Option<(u32, u64)>,
        descs: &[(u64, u32, bool)],
    ) -> Result<Request, Rejected> {
        let vq = MockSplitQueue::new(mem, 16);
        if let Some((t, sector)) = header {
            let h = RawHeader {
                request_type: t.to_le(),
                reserved: 0,
                sector: sector.to_le(),
            };
            mem.write_obj(h, GuestAddress(descs[0].0)).expect("header");
        }
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, (addr, len, w))| {
                let mut flags = if *w { F_WRITE } else { 0 };
                if i + 1 < descs.len() {
                    flags |= F_NEXT;
                }
                RawDescriptor::from(SplitDescriptor::new(*addr, *len, flags, i as u16 + 1))
            })
            .collect();
        vq.build_desc_chain(&raw).expect("chain");
        let mut q: virtio_queue::Queue = vq.create_queue().expect("queue");
        q.set_ready(true);
        let mut chain = q.iter(mem).expect("iter").next().expect("one chain");
        Request::parse(&mut chain)
    }

    #[test]
    fn read_request_parses() {
        let mem = memory();
        let req = parse_chain(
            &mem,
            Some((VIRTIO_BLK_T_IN, 8)),
            &[(0x1000, 16, false), (0x2000, 4096, true), (0x3000, 1, true)],
        )
        .expect("valid");
        assert_eq!(req.kind, RequestKind::Read);
        assert_eq!(req.sector, 8);
        assert_eq!(req.data_len, 4096);
        assert_eq!(req.status, GuestAddress(0x3000));
        assert!(req.check_range(16));
        assert!(!req.check_range(15));
    }

    #[test]
    fn write_with_writable_data_is_rejected_with_status() {
        let mem = memory();
        let err = parse_chain(
            &mem,
            Some((VIRTIO_BLK_T_OUT, 0)),
            &[(0x1000, 16, false), (0x2000, 512, true), (0x3000, 1, true)],
        )
        .expect_err("direction");
        assert_eq!(err.error, ParseError::WrongDirection);
        assert_eq!(err.status, Some(GuestAddress(0x3000)));
    }

    #[test]
    fn out_of_memory_data_is_rejected() {
        let mem = memory();
        let err = parse_chain(
            &mem,
            Some((VIRTIO_BLK_T_IN, 0)),
            &[
                (0x1000, 16, false),
                (0xF_F000, 0x2000, true),
                (0x3000, 1, true),
            ],
        )
        .expect_err("bounds");
        assert!(matches!(err.error, ParseError::OutOfGuestMemory { .. }));
    }

    #[test]
    fn readable_status_gives_no_status_address() {
        let mem = memory();
        let err = parse_chain(
            &mem,
            Some((VIRTIO_BLK_T_IN, 0)),
            &[(0x1000, 16, false), (0x3000, 1, false)],
        )
        .expect_err("status");
        assert_eq!(err.error, ParseError::BadStatusDescriptor);
        assert_eq!(err.status, None);
    }

    #[test]
    fn partial_sector_and_short_header_are_rejected() {
        let mem = memory();
        let err = parse_chain(
            &mem,
            Some((VIRTIO_BLK_T_IN, 0)),
            &[(0x1000, 16, false), (0x2000, 100, true), (0x3000, 1, true)],
        )
        .expect_err("sector multiple");
        assert_eq!(err.error, ParseError::NotSectorMultiple(100));
        let err = parse_chain(&mem, None, &[(0x1000, 8, false), (0x3000, 1, true)])
            .expect_err("short header");
        assert_eq!(err.error, ParseError::BadHeader);
    }

    #[test]
    fn unknown_type_and_discard_ranges() {
        let mem = memory();
        let req = parse_chain(
            &mem,
            Some((0x77, 0)),
            &[(0x1000, 16, false), (0x3000, 1, true)],
        )
        .expect("parses");
        assert_eq!(req.kind, RequestKind::Unsupported(0x77));
        let rec = RawDiscard {
            sector: 64u64.to_le(),
            num_sectors: 8u32.to_le(),
            flags: 0,
        };
        mem.write_obj(rec, GuestAddress(0x2000)).expect("record");
        let req = parse_chain(
            &mem,
            Some((VIRTIO_BLK_T_DISCARD, 0)),
            &[(0x1000, 16, false), (0x2000, 16, false), (0x3000, 1, true)],
        )
        .expect("discard");
        assert_eq!(
            req.ranges,
            vec![SectorRange {
                sector: 64,
                num_sectors: 8,
                unmap: false
            }]
        );
        assert!(req.check_range(72));
        assert!(!req.check_range(71));
        let bad = RawDiscard {
            sector: 0,
            num_sectors: 1,
            flags: 1u32.to_le(),
        };
        mem.write_obj(bad, GuestAddress(0x2000)).expect("record");
        let err = parse_chain(
            &mem,
            Some((VIRTIO_BLK_T_DISCARD, 0)),
            &[(0x1000, 16, false), (0x2000, 16, false), (0x3000, 1, true)],
        )
        .expect_err("unmap flag on discard");
        assert_eq!(err.error, ParseError::BadRangeFlags(1));
    }

    #[test]
    fn overflowing_sector_is_out_of_range() {
        let mem = memory();
        let req = parse_chain(
            &mem,
            Some((VIRTIO_BLK_T_IN, u64::MAX - 1)),
            &[(0x1000, 16, false), (0x2000, 4096, true), (0x3000, 1, true)],
        )
        .expect("parses");
        assert!(!req.check_range(u64::MAX));
    }
}
