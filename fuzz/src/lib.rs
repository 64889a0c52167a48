//! Harnesses behind strait's fuzz targets.
//!
//! They live in a library, not in `fuzz_targets/`, so the seed generator
//! (`examples/seed_corpus.rs`) and the unit tests below drive exactly the code the fuzzer
//! drives, and so `cargo test` checks the harness on stable without libFuzzer.
//!
//! # `request_parse` input format
//!
//! The fuzz bytes describe what a hostile driver controls: a descriptor table, an indirect
//! table, the avail ring entry and the bytes in guest memory the descriptors point at.
//!
//! ```text
//! offset  bytes       field
//! 0       1           head: the avail ring entry, index of the chain's first descriptor
//! 1       1           main_count: descriptors stored in the queue's table at 0..main_count
//! 2       1           indirect_count: descriptors stored in the table at INDIRECT_TABLE_ADDR
//! 3       1           control: CONTROL_WILD_HEAD moves the head out of the table
//! 4       7 * main    the queue's descriptors
//! ..      7 * ind.    the indirect table's descriptors
//! ..      the rest    copied into guest memory at DATA_ADDR (headers, discard records)
//! ```
//!
//! A descriptor is 7 bytes: `addr: u16 LE`, `len: u16 LE`, `flags: u8` (raw virtio flags, so
//! NEXT, WRITE, INDIRECT and unknown bits all occur), `next: u8`, `mode: u8`. The `MODE_*`
//! bits widen a field beyond what 16 bits reach (addresses near `u64::MAX`, lengths near
//! `u32::MAX`, next indices past the table) or aim the descriptor at the indirect table.
//! Addresses are small by default so most inputs land in guest memory and get past the
//! bounds checks into the parser's later stages. Counts larger than the input holds are
//! clamped, so every input of [`ChainCase::MIN_BYTES`] or more builds a chain.
//!
//! Guest memory is 64 KiB in two regions with a hole between them, so descriptors can
//! straddle a region boundary or point into the hole.

use strait_vhost_blk::request::{Rejected, Request, RequestKind};
use strait_vhost_blk::{MAX_DISCARD_SEGMENTS, MAX_QUEUE_SIZE, MAX_REQUEST_BYTES, SECTOR_SIZE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::{DescriptorTable, MockSplitQueue};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// First guest memory region: the queue, the data area and the indirect table.
pub const REGION_A_ADDR: GuestAddress = GuestAddress(0);
/// Size of [`REGION_A_ADDR`]'s region.
pub const REGION_A_BYTES: usize = 0xA000;
/// Second region, after a 4 KiB hole: reachable by `addr` alone, so descriptors can cross
/// the hole or the boundary between regions.
pub const REGION_B_ADDR: GuestAddress = GuestAddress(0xB000);
/// Size of [`REGION_B_ADDR`]'s region; the two regions hold 64 KiB together.
pub const REGION_B_BYTES: usize = 0x6000;

/// The device's largest queue, so the main table alone can hold a chain longer than
/// `MAX_SEGMENTS + 2` descriptors. At 16 bytes a descriptor the table fills 0..0x1000; the
/// avail and used rings follow and end before [`DATA_ADDR`].
pub const QUEUE_SIZE: u16 = MAX_QUEUE_SIZE;
/// Where the input's trailing bytes are copied: request headers and discard records.
pub const DATA_ADDR: GuestAddress = GuestAddress(0x2000);
/// Room for data before the indirect table.
pub const DATA_BYTES: usize = 0x7000;
/// The indirect table; its 255 entries at most end with region A at 0xA000.
pub const INDIRECT_TABLE_ADDR: GuestAddress = GuestAddress(0x9000);

/// Size of a split-queue descriptor in guest memory (virtio 1.2, 2.7.5).
pub const DESCRIPTOR_BYTES: u32 = 16;

/// Descriptor flags (virtio 1.2, 2.7.5), for building seeds.
pub const F_NEXT: u8 = 1;
/// See [`F_NEXT`].
pub const F_WRITE: u8 = 2;
/// See [`F_NEXT`].
pub const F_INDIRECT: u8 = 4;

/// `mode`: the address becomes `u64::MAX - addr`, past every region and near overflow.
pub const MODE_WILD_ADDR: u8 = 1 << 0;
/// `mode`: the length becomes `u32::MAX - len`.
pub const MODE_WILD_LEN: u8 = 1 << 1;
/// `mode`: the descriptor points at the indirect table (address, length and INDIRECT flag
/// set from `indirect_count`), applied before the two wild bits.
pub const MODE_INDIRECT_TABLE: u8 = 1 << 2;
/// `mode`: `next` becomes `0xFF00 | next`, past the end of any table.
pub const MODE_WILD_NEXT: u8 = 1 << 3;

/// `control`: the avail ring entry becomes `0xFF00 | head`, past the end of the table.
pub const CONTROL_WILD_HEAD: u8 = 1 << 0;

/// virtio-blk request types (virtio 1.2, 5.2.6), for building seeds.
pub const T_IN: u32 = 0;
/// See [`T_IN`].
pub const T_OUT: u32 = 1;
/// See [`T_IN`].
pub const T_FLUSH: u32 = 4;
/// See [`T_IN`].
pub const T_GET_ID: u32 = 8;
/// See [`T_IN`].
pub const T_DISCARD: u32 = 11;
/// See [`T_IN`].
pub const T_WRITE_ZEROES: u32 = 13;

/// One descriptor as the fuzz input encodes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FuzzDescriptor {
    pub addr: u16,
    pub len: u16,
    pub flags: u8,
    pub next: u8,
    pub mode: u8,
}

impl FuzzDescriptor {
    /// Encoded size.
    pub const BYTES: usize = 7;

    /// A descriptor at `addr` with no widening.
    pub fn new(addr: u16, len: u16, flags: u8, next: u8) -> FuzzDescriptor {
        FuzzDescriptor {
            addr,
            len,
            flags,
            next,
            mode: 0,
        }
    }

    fn decode(bytes: &[u8]) -> FuzzDescriptor {
        FuzzDescriptor {
            addr: u16::from_le_bytes([bytes[0], bytes[1]]),
            len: u16::from_le_bytes([bytes[2], bytes[3]]),
            flags: bytes[4],
            next: bytes[5],
            mode: bytes[6],
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.addr.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&[self.flags, self.next, self.mode]);
    }

    /// The descriptor as the guest would store it.
    fn to_raw(self, indirect_count: usize) -> RawDescriptor {
        let mut addr = u64::from(self.addr);
        let mut len = u32::from(self.len);
        let mut flags = u16::from(self.flags);
        let mut next = u16::from(self.next);
        if self.mode & MODE_INDIRECT_TABLE != 0 {
            addr = INDIRECT_TABLE_ADDR.0;
            // At most 255 entries: fits in u32.
            len = indirect_count as u32 * DESCRIPTOR_BYTES;
            flags |= u16::from(F_INDIRECT);
        }
        if self.mode & MODE_WILD_ADDR != 0 {
            addr = u64::MAX - addr;
        }
        if self.mode & MODE_WILD_LEN != 0 {
            len = u32::MAX - len;
        }
        if self.mode & MODE_WILD_NEXT != 0 {
            next |= 0xFF00;
        }
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }
}

/// A decoded `request_parse` input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainCase {
    pub head: u8,
    pub control: u8,
    /// Invariant: at most 255 entries (the count is one byte).
    pub main: Vec<FuzzDescriptor>,
    /// Invariant: at most 255 entries (the count is one byte).
    pub indirect: Vec<FuzzDescriptor>,
    /// Copied to [`DATA_ADDR`]; bytes past [`DATA_BYTES`] are dropped.
    pub data: Vec<u8>,
}

impl ChainCase {
    /// The fixed fields and one descriptor: anything shorter cannot describe a chain.
    pub const MIN_BYTES: usize = 4 + FuzzDescriptor::BYTES;

    /// Decodes fuzz bytes; `None` when they are shorter than [`ChainCase::MIN_BYTES`].
    pub fn decode(bytes: &[u8]) -> Option<ChainCase> {
        if bytes.len() < Self::MIN_BYTES {
            return None;
        }
        fn take(count: u8, rest: &mut &[u8]) -> Vec<FuzzDescriptor> {
            let count = usize::from(count).min(rest.len() / FuzzDescriptor::BYTES);
            let (descs, tail) = rest.split_at(count * FuzzDescriptor::BYTES);
            *rest = tail;
            descs
                .chunks_exact(FuzzDescriptor::BYTES)
                .map(FuzzDescriptor::decode)
                .collect()
        }
        let (fixed, mut rest) = bytes.split_at(4);
        let main = take(fixed[1], &mut rest);
        let indirect = take(fixed[2], &mut rest);
        let data = rest[..rest.len().min(DATA_BYTES)].to_vec();
        Some(ChainCase {
            head: fixed[0],
            control: fixed[3],
            main,
            indirect,
            data,
        })
    }

    /// The inverse of [`ChainCase::decode`], for writing seeds.
    pub fn encode(&self) -> Vec<u8> {
        assert!(
            self.main.len() <= usize::from(u8::MAX),
            "main table too long"
        );
        assert!(
            self.indirect.len() <= usize::from(u8::MAX),
            "indirect table too long"
        );
        let mut out = vec![
            self.head,
            self.main.len() as u8,
            self.indirect.len() as u8,
            self.control,
        ];
        for desc in self.main.iter().chain(&self.indirect) {
            desc.encode(&mut out);
        }
        out.extend_from_slice(&self.data);
        out
    }
}

/// The fuzzed guest's memory: two regions, 64 KiB in all, zeroed.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (REGION_A_ADDR, REGION_A_BYTES),
        (REGION_B_ADDR, REGION_B_BYTES),
    ])
    .expect("two fixed, disjoint regions map")
}

/// Builds the chain `bytes` describe, pops it and parses it, then checks what the parser
/// promises about its result. `None` for input too short to describe a chain.
///
/// Panics (so the fuzzer reports a crash) if the parser panics or breaks a promise.
pub fn request_parse(bytes: &[u8]) -> Option<Result<Request, Rejected>> {
    let case = ChainCase::decode(bytes)?;
    let mem = guest_memory();
    // Sets up the rings (and zeroes their indices) before anything else is written.
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    mem.write_slice(&case.data, DATA_ADDR)
        .expect("data fits below the indirect table");
    for (index, desc) in case.main.iter().enumerate() {
        vq.desc_table()
            // At most 255 entries in a 256-entry table.
            .store(index as u16, desc.to_raw(case.indirect.len()))
            .expect("index is inside the queue's table");
    }
    let indirect_table = DescriptorTable::new(&mem, INDIRECT_TABLE_ADDR, QUEUE_SIZE);
    for (index, desc) in case.indirect.iter().enumerate() {
        indirect_table
            .store(index as u16, desc.to_raw(case.indirect.len()))
            .expect("index is inside the indirect table");
    }
    let head = if case.control & CONTROL_WILD_HEAD != 0 {
        0xFF00 | u16::from(case.head)
    } else {
        u16::from(case.head)
    };
    vq.avail()
        .ring()
        .ref_at(0)
        .expect("the avail ring has an entry 0")
        .store(head.to_le());
    vq.avail().idx().store(1u16.to_le());

    let mut queue: Queue = vq.create_queue().expect("mock queue parameters are valid");
    let mut chain = queue
        .pop_descriptor_chain(&mem)
        .expect("the avail ring offers one chain");
    let result = Request::parse(&mut chain);
    check_promises(&mem, &result);
    Some(result)
}

/// What a caller of `Request::parse` relies on: everything it hands back lies in guest
/// memory, lengths add up and stay within the device's limits.
fn check_promises(mem: &GuestMemoryMmap, result: &Result<Request, Rejected>) {
    let request = match result {
        Ok(request) => request,
        Err(rejected) => {
            if let Some(status) = rejected.status {
                assert!(
                    mem.check_range(status, 1, Permissions::Write),
                    "rejected chain names an unwritable status byte: {rejected:?}"
                );
            }
            return;
        }
    };
    assert!(
        mem.check_range(request.status, 1, Permissions::Write),
        "status byte outside guest memory: {request:?}"
    );
    assert!(u64::from(request.data_len) <= MAX_REQUEST_BYTES);
    let device_writes = matches!(request.kind, RequestKind::Read | RequestKind::GetId);
    let access = if device_writes {
        Permissions::Write
    } else {
        Permissions::Read
    };
    for segment in &request.segments {
        assert!(segment.len > 0, "empty segment kept: {request:?}");
        assert!(
            mem.check_range(segment.addr, segment.len as usize, access),
            "segment outside guest memory: {request:?}"
        );
    }
    let segment_bytes: u64 = request.segments.iter().map(|s| u64::from(s.len)).sum();
    match request.kind {
        RequestKind::Read | RequestKind::Write | RequestKind::GetId => {
            assert_eq!(segment_bytes, u64::from(request.data_len));
            assert!(request.ranges.is_empty());
            if request.kind != RequestKind::GetId {
                assert_eq!(u64::from(request.data_len) % SECTOR_SIZE, 0);
            }
        }
        RequestKind::Discard | RequestKind::WriteZeroes => {
            assert!(request.segments.is_empty());
            assert!(!request.ranges.is_empty());
            assert!(request.ranges.len() <= MAX_DISCARD_SEGMENTS as usize);
            assert_eq!(
                u64::from(request.data_len),
                request.ranges.len() as u64 * 16,
                "payload is not exactly the range records: {request:?}"
            );
            if request.kind == RequestKind::Discard {
                assert!(request.ranges.iter().all(|r| !r.unmap));
            }
        }
        RequestKind::Flush | RequestKind::Unsupported(_) => {
            assert!(request.segments.is_empty() && request.ranges.is_empty());
            assert_eq!(request.data_len, 0);
        }
    }
    // A request that fits a disk fits every larger one; probe edges where sector
    // arithmetic would overflow.
    let capacities = [
        0,
        1,
        request.sector,
        request.sector.wrapping_add(1),
        u64::MAX,
    ];
    for capacity in capacities {
        if request.check_range(capacity) {
            assert!(
                request.check_range(u64::MAX),
                "check_range is not monotonic"
            );
        }
    }
}

/// Named inputs that reach each stage of the parser, for a fresh corpus.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let header = |request_type: u32, sector: u64| {
        let mut bytes = request_type.to_le_bytes().to_vec();
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&sector.to_le_bytes());
        bytes
    };
    let data_addr = DATA_ADDR.0 as u16;
    let record_addr = data_addr + 16;
    let record = |sector: u64, num_sectors: u32, flags: u32| {
        let mut bytes = sector.to_le_bytes().to_vec();
        bytes.extend_from_slice(&num_sectors.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes
    };
    // Header, data descriptors in chain order, status: the framing every driver uses.
    let framed = |data: &[(u16, u16, u8)]| {
        let mut descs = vec![FuzzDescriptor::new(data_addr, 16, F_NEXT, 1)];
        for (i, &(addr, len, flags)) in data.iter().enumerate() {
            descs.push(FuzzDescriptor::new(addr, len, flags | F_NEXT, i as u8 + 2));
        }
        descs.push(FuzzDescriptor::new(0x8000, 1, F_WRITE, 0));
        descs
    };
    let simple = |main: Vec<FuzzDescriptor>, data: Vec<u8>| ChainCase {
        main,
        data,
        ..ChainCase::default()
    };

    let read = simple(framed(&[(0x3000, 4096, F_WRITE)]), header(T_IN, 8));
    let write_segments: Vec<_> = (0..126u16).map(|i| (0x3000 + i * 64, 512, 0)).collect();
    let write = simple(framed(&write_segments), header(T_OUT, 0));
    let mut discard_data = header(T_DISCARD, 0);
    discard_data.extend(record(64, 8, 0));
    discard_data.extend(record(128, 8, 0));
    let discard = simple(framed(&[(record_addr, 32, 0)]), discard_data);
    let mut zeroes_data = header(T_WRITE_ZEROES, 0);
    zeroes_data.extend(record(0, 16, 1));
    // One record split over two descriptors, as the spec allows.
    let write_zeroes = simple(
        framed(&[(record_addr, 8, 0), (record_addr + 8, 8, 0)]),
        zeroes_data,
    );
    let flush = simple(framed(&[]), header(T_FLUSH, 0));
    let get_id = simple(framed(&[(0x3000, 20, F_WRITE)]), header(T_GET_ID, 0));
    let indirect = ChainCase {
        main: vec![FuzzDescriptor {
            mode: MODE_INDIRECT_TABLE,
            ..FuzzDescriptor::default()
        }],
        indirect: framed(&[(0x3000, 4096, F_WRITE)]),
        data: header(T_IN, 0),
        ..ChainCase::default()
    };
    let mut long_indirect = indirect.clone();
    long_indirect.indirect = framed(&[(0x3000, 512, F_WRITE); 130]);
    // A descriptor that leads back to the head: the walk stops at the descriptor limit.
    let looped = simple(
        vec![
            FuzzDescriptor::new(data_addr, 16, F_NEXT, 1),
            FuzzDescriptor::new(0x8000, 1, F_WRITE | F_NEXT, 0),
        ],
        header(T_IN, 0),
    );
    // A link past the end of the table.
    let mut bad_next = read.clone();
    bad_next.main[0].mode = MODE_WILD_NEXT;
    // Data that runs from region A into the hole.
    let into_hole = simple(framed(&[(0x9E00, 0x400, F_WRITE)]), header(T_IN, 0));

    [
        ("read_4k", read),
        ("write_126_segments", write),
        ("discard_2_ranges", discard),
        ("write_zeroes_split_record", write_zeroes),
        ("flush", flush),
        ("get_id", get_id),
        ("indirect_read", indirect),
        ("indirect_too_long", long_indirect),
        ("loop", looped),
        ("bad_next", bad_next),
        ("into_hole", into_hole),
    ]
    .into_iter()
    .map(|(name, case)| (name, case.encode()))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_vhost_blk::request::ParseError;

    fn parse_seed(name: &str) -> Result<Request, Rejected> {
        let seeds = seeds();
        let (_, bytes) = seeds.iter().find(|(n, _)| *n == name).expect("seed exists");
        request_parse(bytes).expect("seed is long enough")
    }

    #[test]
    fn encoding_round_trips() {
        for (name, bytes) in seeds() {
            let case = ChainCase::decode(&bytes).expect(name);
            assert_eq!(case.encode(), bytes, "{name}");
        }
    }

    #[test]
    fn short_and_truncated_inputs() {
        assert!(request_parse(&[0; ChainCase::MIN_BYTES - 1]).is_none());
        // Counts past the end are clamped rather than rejected.
        let case = ChainCase::decode(&[0, 200, 200, 0, 1, 2, 3, 4, 5, 6, 7, 8]).expect("long");
        assert_eq!(case.main.len(), 1);
        assert!(case.indirect.is_empty());
        assert_eq!(case.data, vec![8]);
    }

    #[test]
    fn seeds_reach_every_stage() {
        let read = parse_seed("read_4k").expect("read parses");
        assert_eq!(
            (read.kind, read.sector, read.data_len),
            (RequestKind::Read, 8, 4096)
        );
        let write = parse_seed("write_126_segments").expect("write parses");
        assert_eq!(write.segments.len(), 126);
        let discard = parse_seed("discard_2_ranges").expect("discard parses");
        assert_eq!(discard.ranges.len(), 2);
        let zeroes = parse_seed("write_zeroes_split_record").expect("write-zeroes parses");
        assert!(zeroes.ranges[0].unmap);
        assert_eq!(parse_seed("flush").expect("flush").kind, RequestKind::Flush);
        assert_eq!(parse_seed("get_id").expect("get_id").data_len, 20);
        let indirect = parse_seed("indirect_read").expect("indirect parses");
        assert_eq!(indirect.data_len, 4096);
        let long = parse_seed("indirect_too_long").expect_err("too long");
        assert!(matches!(long.error, ParseError::TooManyDescriptors(_)));
        let looped = parse_seed("loop").expect_err("loop");
        assert!(matches!(looped.error, ParseError::TooManyDescriptors(_)));
        let bad_next = parse_seed("bad_next").expect_err("bad next");
        assert_eq!(bad_next.error, ParseError::BrokenChain);
        let hole = parse_seed("into_hole").expect_err("hole");
        assert!(matches!(hole.error, ParseError::OutOfGuestMemory { .. }));
    }
}
