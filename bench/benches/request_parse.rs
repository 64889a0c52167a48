//! The cost of validating one virtio-blk request: `Request::parse` walks the descriptor
//! chain, bounds-checks every descriptor and reads the header before any disk work starts,
//! so it is paid on every guest I/O.
//!
//! Cases: a 4 KiB read in three descriptors (the common Linux framing), a write with the
//! full `MAX_SEGMENTS` data segments, a read framed in an indirect table, and a chain
//! rejected after the whole walk (a write whose data descriptor is device-writable).
//!
//! Each chain is built once; an iteration parses a clone of it (a chain is an iterator that
//! parsing consumes; the clone copies a few words and touches no guest memory). The
//! defaults keep a run to a few seconds; criterion's flags override them:
//!
//! ```text
//! cargo bench -p strait-bench --bench request_parse -- --warm-up-time 0.2 --measurement-time 0.5
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use strait_vhost_blk::request::{ParseError, Request, RequestKind};
use strait_vhost_blk::{MAX_QUEUE_SIZE, MAX_SEGMENTS};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::{DescriptorTable, MockSplitQueue};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Descriptor flags (virtio 1.2, 2.7.5).
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// Request types (virtio 1.2, 5.2.6).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

/// Guest memory: one 64 KiB slot per case, then the data pages all cases share. Chains
/// are re-read from guest memory on every parse, so each case keeps its own queue, header
/// and status in its slot.
const MEMORY_BYTES: usize = 2 << 20;
const SLOT_BYTES: u64 = 0x1_0000;
/// Within a slot: the queue's table (4 KiB for 256 entries) and rings come first.
const HEADER_OFFSET: u64 = 0x2000;
const STATUS_OFFSET: u64 = 0x2010;
const INDIRECT_TABLE_OFFSET: u64 = 0x3000;
/// `MAX_SEGMENTS` 4 KiB pages from here end at 0x17_E000, inside [`MEMORY_BYTES`]. Only
/// their bounds are checked, so cases may share them.
const DATA_ADDR: u64 = 0x10_0000;
const PAGE_BYTES: u32 = 4096;
const HEADER_BYTES: u32 = 16;
const DESCRIPTOR_BYTES: u32 = 16;

/// Short by default so the suite can run on every CI push; criterion's
/// `--warm-up-time`/`--measurement-time` override both.
const WARM_UP: Duration = Duration::from_millis(500);
const MEASUREMENT: Duration = Duration::from_secs(2);
/// Fewer bootstrap resamples than criterion's 100 000: the analysis otherwise takes longer
/// than a short measurement, and the confidence interval of a ns-scale loop barely moves.
const RESAMPLES: usize = 10_000;

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_BYTES)]).expect("guest memory maps")
}

fn descriptor(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// One case's corner of guest memory.
struct Slot<'m> {
    mem: &'m GuestMemoryMmap,
    base: u64,
}

impl<'m> Slot<'m> {
    fn new(mem: &'m GuestMemoryMmap, index: u64) -> Slot<'m> {
        Slot {
            mem,
            base: index * SLOT_BYTES,
        }
    }

    /// Writes the request header and returns header, `data` and status descriptors in
    /// chain order, links not yet set.
    fn framed(
        &self,
        request_type: u32,
        sector: u64,
        data: impl IntoIterator<Item = (u64, u32, u16)>,
    ) -> Vec<RawDescriptor> {
        let mut header = [0u8; HEADER_BYTES as usize];
        header[..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        let header_addr = self.base + HEADER_OFFSET;
        self.mem
            .write_slice(&header, GuestAddress(header_addr))
            .expect("header fits in guest memory");
        let mut descs = vec![descriptor(header_addr, HEADER_BYTES, 0, 0)];
        descs.extend(
            data.into_iter()
                .map(|(addr, len, flags)| descriptor(addr, len, flags, 0)),
        );
        descs.push(descriptor(self.base + STATUS_OFFSET, 1, F_WRITE, 0));
        descs
    }

    /// A chain of `descs`, linked, in this slot's queue.
    fn chain(&self, descs: &[RawDescriptor]) -> DescriptorChain<&'m GuestMemoryMmap> {
        let vq = MockSplitQueue::create(self.mem, GuestAddress(self.base), MAX_QUEUE_SIZE);
        vq.add_desc_chains(&linked(descs), 0)
            .expect("chain fits in the queue");
        let mut queue: Queue = vq.create_queue().expect("mock queue parameters are valid");
        queue
            .pop_descriptor_chain(self.mem)
            .expect("the avail ring offers the chain")
    }

    /// Writes `descs`, linked, as an indirect table and returns a one-descriptor chain
    /// pointing at it.
    fn indirect_chain(&self, descs: &[RawDescriptor]) -> DescriptorChain<&'m GuestMemoryMmap> {
        let count = u16::try_from(descs.len()).expect("indirect table fits a u16 count");
        let table_addr = self.base + INDIRECT_TABLE_OFFSET;
        let table = DescriptorTable::new(self.mem, GuestAddress(table_addr), count);
        for (index, desc) in (0..count).zip(linked(descs)) {
            table.store(index, desc).expect("index inside the table");
        }
        let table_bytes = u32::from(count) * DESCRIPTOR_BYTES;
        self.chain(&[descriptor(table_addr, table_bytes, F_INDIRECT, 0)])
    }
}

/// `descs` as one chain laid out from table index 0: each links to the next.
fn linked(descs: &[RawDescriptor]) -> Vec<RawDescriptor> {
    let last = descs.len().saturating_sub(1);
    descs
        .iter()
        .enumerate()
        .map(|(index, desc)| {
            let desc = SplitDescriptor::from(*desc);
            let (flags, next) = if index < last {
                // Chains here are at most 128 long, inside the 256-entry table.
                (desc.flags() | F_NEXT, index as u16 + 1)
            } else {
                (desc.flags() & !F_NEXT, 0)
            };
            descriptor(desc.addr().0, desc.len(), flags, next)
        })
        .collect()
}

fn parse_once(chain: &DescriptorChain<&GuestMemoryMmap>) -> Result<Request, ParseError> {
    Request::parse(&mut chain.clone()).map_err(|rejected| rejected.error)
}

fn bench_request_parse(c: &mut Criterion) {
    let mem = guest_memory();
    let page = |i: u64| DATA_ADDR + i * u64::from(PAGE_BYTES);

    let slot = Slot::new(&mem, 0);
    let read = slot.chain(&slot.framed(T_IN, 8, [(page(0), PAGE_BYTES, F_WRITE)]));
    let parsed = parse_once(&read).expect("read parses");
    assert_eq!(
        (parsed.kind, parsed.data_len),
        (RequestKind::Read, PAGE_BYTES)
    );

    let slot = Slot::new(&mem, 1);
    let pages = (0..MAX_SEGMENTS as u64).map(|i| (page(i), PAGE_BYTES, 0));
    let write = slot.chain(&slot.framed(T_OUT, 0, pages));
    let parsed = parse_once(&write).expect("write parses");
    assert_eq!(
        (parsed.kind, parsed.segments.len()),
        (RequestKind::Write, MAX_SEGMENTS)
    );

    let slot = Slot::new(&mem, 2);
    let indirect = slot.indirect_chain(&slot.framed(T_IN, 8, [(page(0), PAGE_BYTES, F_WRITE)]));
    let parsed = parse_once(&indirect).expect("indirect read parses");
    assert_eq!(
        (parsed.kind, parsed.data_len),
        (RequestKind::Read, PAGE_BYTES)
    );

    // Rejected only after the whole chain is walked and the header read, so the case
    // measures a rejection's full cost rather than an early exit.
    let slot = Slot::new(&mem, 3);
    let rejected = slot.chain(&slot.framed(T_OUT, 0, [(page(0), PAGE_BYTES, F_WRITE)]));
    let error = parse_once(&rejected).expect_err("a write from a device-writable buffer");
    assert_eq!(error, ParseError::WrongDirection);

    let mut group = c.benchmark_group("request_parse");
    let cases = [
        ("read_4k_3_descriptors", &read),
        ("write_126_segments", &write),
        ("indirect_read_4k", &indirect),
        ("rejected_wrong_direction", &rejected),
    ];
    for (name, chain) in cases {
        group.bench_function(name, |b| {
            b.iter(|| Request::parse(&mut black_box(chain).clone()))
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(WARM_UP)
        .measurement_time(MEASUREMENT)
        .nresamples(RESAMPLES)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_request_parse
}
criterion_main!(benches);
