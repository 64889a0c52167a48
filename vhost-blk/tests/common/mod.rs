//! A VM-less rig for the block backend: a raw image, a running [`Backend`], guest memory in a
//! memfd shared with it, the `vhost` crate's vhost-user frontend (the one Cloud Hypervisor
//! uses), and a driver-side split virtqueue built from `virtio_queue::mock`'s ring types.
//!
//! Guest memory layout (GPA, 4 KiB pages; the dirty log and the tests rely on these pages
//! being distinct):
//!
//! | pages            | what                                                         |
//! |------------------|--------------------------------------------------------------|
//! | `4i`             | queue `i`'s descriptor table (256 entries x 16 bytes = 1 page) |
//! | `4i + 1`         | queue `i`'s avail ring, and its used ring at offset 0x400    |
//! | 8..=15           | indirect descriptor tables                                   |
//! | `16 + i`         | queue `i`'s request headers, a 16-byte slot per descriptor   |
//! | `32 + i`         | queue `i`'s status bytes, one per descriptor index           |
//! | 256.. (1 MiB..)  | data buffers                                                 |

#![allow(clippy::unwrap_used, dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strait_vhost_blk::{Backend, BackendConfig, QueueSnapshot};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Size of the test image: small enough to write per test, large enough for distinct ranges.
pub const IMAGE_BYTES: u64 = 8 << 20;
/// Guest memory: 1024 pages of 4 KiB.
pub const MEM_BYTES: usize = 4 << 20;
/// The vhost-user dirty log's page size.
pub const PAGE: u64 = 4096;
pub const SECTOR: u64 = 512;
/// Ring size of every driver queue: exactly one page of descriptors.
pub const QUEUE_SIZE: u16 = 256;
/// How long any single wait may take. Requests complete in microseconds; 10 s only trips
/// when the backend is stuck, and then the test fails instead of hanging.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// Interval of the bounded polls below.
const POLL: Duration = Duration::from_millis(1);

pub const HEADER_AREA: u64 = 0x1_0000;
pub const STATUS_AREA: u64 = 0x2_0000;
pub const INDIRECT_AREA: u64 = 0x8000;
pub const DATA_AREA: u64 = 0x10_0000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// What a status byte holds before the device writes it.
pub const STATUS_UNTOUCHED: u8 = 0xEE;

pub const VIRTIO_F_VERSION_1: u32 = 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
pub const VIRTIO_BLK_F_MQ: u32 = 12;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VHOST_F_LOG_ALL: u32 = 26;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

pub fn bit(n: u32) -> u64 {
    1u64 << n
}

/// The byte the test image holds at `offset`: differs between neighbouring sectors and
/// between bytes of a sector, so a misplaced read shows.
pub fn image_byte(offset: u64) -> u8 {
    let sector = offset / SECTOR;
    (offset as u8) ^ (sector.wrapping_mul(0x9E37) >> 3) as u8 ^ 0x5A
}

pub fn image_bytes(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| image_byte(offset + i)).collect()
}

/// A recognisable buffer for writes.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// An anonymous memory file (shareable with the backend over the socket).
pub fn memfd(name: &str, len: u64) -> File {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call; the flags are
    // a valid combination.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create, is valid, and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}

/// How to start the backend of one rig.
#[derive(Debug, Clone)]
pub struct RigOptions {
    pub queues: u16,
    pub cores: Vec<usize>,
    pub read_only: bool,
    pub serial: Option<String>,
}

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            queues: 1,
            cores: vec![0],
            read_only: false,
            serial: Some("strait-test-serial".into()),
        }
    }
}

/// One backend on its own image and socket, plus the guest memory a frontend shares with it.
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub socket: PathBuf,
    pub backend: Backend,
    pub mem: GuestMemoryMmap,
    pub options: RigOptions,
}

impl Rig {
    pub fn start(options: RigOptions) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::write(&image, image_bytes(0, IMAGE_BYTES as usize)).unwrap();
        let socket = dir.path().join("vhost.sock");
        let backend = Backend::start(BackendConfig {
            disk: image.clone(),
            socket: socket.clone(),
            queues: options.queues,
            cores: options.cores.clone(),
            read_only: options.read_only,
            serial: options.serial.clone(),
            direct_io: true,
            fenced: false,
        })
        .unwrap();
        let file = memfd("strait-guest-ram", MEM_BYTES as u64);
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_BYTES,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        Rig {
            dir,
            image,
            socket,
            backend,
            mem,
            options,
        }
    }

    /// Every virtio feature the device offers except `VHOST_F_LOG_ALL`, as a guest driver
    /// that knows them all would accept.
    pub fn default_features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VHOST_USER_F_PROTOCOL_FEATURES);
        for b in [1, 2, 6, 9, 10, 11, 13, 14] {
            // SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, TOPOLOGY, CONFIG_WCE, DISCARD, WRITE_ZEROES
            f |= bit(b);
        }
        if self.options.queues > 1 {
            f |= bit(VIRTIO_BLK_F_MQ);
        }
        if self.options.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        }
        f
    }

    /// Connects a frontend and negotiates `features` and every protocol feature the device
    /// offers, then shares guest memory. Every later message waits for the backend's ack.
    pub fn connect(&self, features: u64) -> Frontend {
        let mut fe = Frontend::connect(&self.socket, u64::from(self.options.queues)).unwrap();
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        assert_eq!(
            offered & features,
            features,
            "device does not offer {:#x}",
            features & !offered
        );
        let wanted = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK;
        let protocol = fe.get_protocol_features().unwrap();
        assert!(protocol.contains(wanted), "protocol features {protocol:?}");
        fe.set_protocol_features(wanted).unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        fe.set_features(features).unwrap();
        assert_eq!(fe.get_queue_num().unwrap(), u64::from(self.options.queues));
        self.share_memory(&fe);
        fe
    }

    /// `SET_MEM_TABLE` with the one memfd region.
    pub fn share_memory(&self, fe: &Frontend) {
        let region = self.mem.iter().next().unwrap();
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        fe.set_mem_table(&[info]).unwrap();
    }

    /// The guest-physical-to-frontend-virtual translation vring addresses go through.
    pub fn host_va(&self, gpa: u64) -> u64 {
        let region = self.mem.iter().next().unwrap();
        region.as_ptr() as u64 + gpa - region.start_addr().0
    }

    /// Sets up queue `index` on the backend and returns its driver side.
    pub fn queue<'a>(&'a self, fe: &Frontend, index: u16) -> DriverQueue<'a> {
        let base = GuestAddress(u64::from(index) * 4 * PAGE);
        let vq = Rings::new(&self.mem, base);
        let q = DriverQueue {
            mem: &self.mem,
            vq,
            index,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
            next_desc: 0,
            used_seen: 0,
            interrupts: 0,
        };
        self.attach(fe, &q, 0);
        q
    }

    /// (Re)attaches the backend to an existing driver queue, starting at avail index `base`.
    pub fn attach(&self, fe: &Frontend, q: &DriverQueue<'_>, base: u16) {
        let i = usize::from(q.index);
        let mut fe = fe.clone();
        fe.set_vring_num(i, QUEUE_SIZE).unwrap();
        fe.set_vring_addr(
            i,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: self.host_va(q.vq.desc_table_addr().0),
                used_ring_addr: self.host_va(q.vq.used_addr().0),
                avail_ring_addr: self.host_va(q.vq.avail_addr().0),
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(i, base).unwrap();
        fe.set_vring_call(i, &q.call).unwrap();
        fe.set_vring_kick(i, &q.kick).unwrap();
        fe.set_vring_enable(i, true).unwrap();
    }

    /// The 60-byte virtio-blk config space, through `GET_CONFIG`.
    pub fn config_space(&self, fe: &Frontend) -> Vec<u8> {
        let mut fe = fe.clone();
        let (_, payload) = fe
            .get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
            .unwrap();
        payload
    }

    /// The image file as the host sees it.
    pub fn disk(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        File::open(&self.image)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }

    pub fn counters(&self, queue: u16) -> QueueSnapshot {
        self.backend.stats()[usize::from(queue)].counters.clone()
    }

    pub fn read_guest(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(gpa)).unwrap();
        buf
    }

    pub fn write_guest(&self, gpa: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(gpa)).unwrap();
    }
}

/// The three parts of a split virtqueue, placed by hand. (`MockSplitQueue::create` puts the
/// used ring inside the avail ring: virtio-queue 0.18's `SplitQueueRing::end` adds the
/// element count instead of the byte length, so the device's used entries overwrite the
/// driver's upper avail entries and `used_event`.)
pub struct Rings<'a> {
    desc: DescriptorTable<'a, GuestMemoryMmap>,
    avail: AvailRing<'a, GuestMemoryMmap>,
    used: UsedRing<'a, GuestMemoryMmap>,
    desc_addr: GuestAddress,
    avail_addr: GuestAddress,
    used_addr: GuestAddress,
}

impl<'a> Rings<'a> {
    /// Descriptor table on the page at `base`, avail ring on the next page, used ring 1 KiB
    /// into that page (the avail ring of 256 entries takes 518 bytes, the used ring 2054).
    fn new(mem: &'a GuestMemoryMmap, base: GuestAddress) -> Rings<'a> {
        let desc_addr = base;
        let avail_addr = GuestAddress(base.0 + PAGE);
        let used_addr = GuestAddress(base.0 + PAGE + 0x400);
        assert!(16 * u64::from(QUEUE_SIZE) <= PAGE);
        assert!(6 + 2 * u64::from(QUEUE_SIZE) <= 0x400);
        assert!(0x400 + 6 + 8 * u64::from(QUEUE_SIZE) <= PAGE);
        Rings {
            desc: DescriptorTable::new(mem, desc_addr, QUEUE_SIZE),
            avail: AvailRing::new(mem, avail_addr, QUEUE_SIZE),
            used: UsedRing::new(mem, used_addr, QUEUE_SIZE),
            desc_addr,
            avail_addr,
            used_addr,
        }
    }

    pub fn desc_table(&self) -> &DescriptorTable<'a, GuestMemoryMmap> {
        &self.desc
    }

    pub fn avail(&self) -> &AvailRing<'a, GuestMemoryMmap> {
        &self.avail
    }

    pub fn used(&self) -> &UsedRing<'a, GuestMemoryMmap> {
        &self.used
    }

    pub fn desc_table_addr(&self) -> GuestAddress {
        self.desc_addr
    }

    pub fn avail_addr(&self) -> GuestAddress {
        self.avail_addr
    }

    pub fn used_addr(&self) -> GuestAddress {
        self.used_addr
    }
}

/// One buffer of a request: guest address, length, whether the device writes it.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub device_writes: bool,
}

impl Buf {
    /// A buffer the device fills (reads, GET_ID).
    pub fn to_guest(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            device_writes: true,
        }
    }

    /// A buffer the device reads (writes, discard ranges).
    pub fn from_guest(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            device_writes: false,
        }
    }
}

/// A submitted chain: where its head and status byte are.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    pub head: u16,
    pub status_addr: u64,
}

/// A used-ring entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub id: u32,
    pub len: u32,
}

/// A completed request: its used entry and the status byte the device wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub status: u8,
    pub used_len: u32,
}

/// The driver side of one split virtqueue.
pub struct DriverQueue<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub vq: Rings<'a>,
    pub index: u16,
    pub kick: EventFd,
    pub call: EventFd,
    // Next free descriptor index; requests are short-lived, so the table is used as a ring.
    next_desc: u16,
    // Used entries consumed so far (the driver's `last_used_idx`).
    used_seen: u16,
    pub interrupts: u64,
}

impl DriverQueue<'_> {
    /// Allocates `n` consecutive descriptor indices.
    pub fn alloc(&mut self, n: u16) -> u16 {
        assert!(n <= QUEUE_SIZE);
        if self.next_desc + n > QUEUE_SIZE {
            self.next_desc = 0;
        }
        let first = self.next_desc;
        self.next_desc += n;
        first
    }

    pub fn store_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        self.vq.desc_table().store(index, d).unwrap();
    }

    /// Offers the chain starting at descriptor `head` (no kick).
    pub fn offer(&self, head: u16) {
        let idx = self.vq.avail().idx().load();
        self.vq
            .avail()
            .ring()
            .ref_at(usize::from(idx % QUEUE_SIZE))
            .unwrap()
            .store(head);
        // EVENT_IDX: ask for an interrupt as soon as the next used entry appears.
        self.mem
            .write_obj(self.used_seen, self.used_event_addr())
            .unwrap();
        self.vq.avail().idx().store(idx.wrapping_add(1));
    }

    /// Offers a chain made of `descs` (linked in order) and returns its head.
    pub fn offer_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let first = self.alloc(descs.len() as u16);
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let index = first + i as u16;
            let (flags, next) = if i + 1 < descs.len() {
                (flags | F_NEXT, index + 1)
            } else {
                (*flags, 0)
            };
            self.store_desc(index, *addr, *len, flags, next);
        }
        self.offer(first);
        first
    }

    /// Writes a request header into the header slot of descriptor `slot`.
    pub fn write_header(&self, slot: u16, request_type: u32, sector: u64) -> u64 {
        let addr = HEADER_AREA + u64::from(self.index) * PAGE + 16 * u64::from(slot);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(addr)).unwrap();
        addr
    }

    /// Offers a well-framed virtio-blk request: header, `bufs`, status byte at its default
    /// slot.
    pub fn submit(&mut self, request_type: u32, sector: u64, bufs: &[Buf]) -> Ticket {
        let head = self.next_head(bufs.len() as u16 + 2);
        let status_addr = STATUS_AREA + u64::from(self.index) * PAGE + u64::from(head);
        self.submit_with_status(request_type, sector, bufs, status_addr)
    }

    /// Like [`DriverQueue::submit`] with the status byte at `status_addr`.
    pub fn submit_with_status(
        &mut self,
        request_type: u32,
        sector: u64,
        bufs: &[Buf],
        status_addr: u64,
    ) -> Ticket {
        let n = bufs.len() as u16 + 2;
        let head = self.next_head(n);
        let header = self.write_header(head, request_type, sector);
        self.mem
            .write_obj(STATUS_UNTOUCHED, GuestAddress(status_addr))
            .unwrap();
        let mut descs = vec![(header, 16, 0)];
        descs.extend(
            bufs.iter()
                .map(|b| (b.addr, b.len, if b.device_writes { F_WRITE } else { 0 })),
        );
        descs.push((status_addr, 1, F_WRITE));
        let got = self.offer_chain(&descs);
        assert_eq!(got, head);
        Ticket { head, status_addr }
    }

    /// The head index the next chain of `n` descriptors gets.
    pub fn next_head(&self, n: u16) -> u16 {
        if self.next_desc + n > QUEUE_SIZE {
            0
        } else {
            self.next_desc
        }
    }

    pub fn notify(&self) {
        self.kick.write(1).unwrap();
    }

    fn used_event_addr(&self) -> GuestAddress {
        GuestAddress(self.vq.avail_addr().0 + 4 + 2 * u64::from(QUEUE_SIZE))
    }

    /// The driver's `used_event` (EVENT_IDX): interrupt me once this entry is used.
    pub fn used_event(&self) -> u16 {
        self.mem.read_obj(self.used_event_addr()).unwrap()
    }

    /// The device's `avail_event` (EVENT_IDX): where it has walked the avail ring to when it
    /// last re-enabled notifications.
    pub fn avail_event(&self) -> u16 {
        let addr = self.vq.used_addr().0 + 4 + 8 * u64::from(QUEUE_SIZE);
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn used_idx(&self) -> u16 {
        self.vq.used().idx().load()
    }

    /// Waits (bounded) until `count` more used entries appear and an interrupt arrived for
    /// them, and consumes them.
    pub fn wait_used(&mut self, count: u16) -> Vec<Used> {
        if count == 0 {
            return Vec::new();
        }
        let target = self.used_seen.wrapping_add(count);
        let start = Instant::now();
        let mut interrupted = false;
        loop {
            if let Ok(n) = self.call.read() {
                self.interrupts += n;
                interrupted = true;
            }
            let have = self.used_idx().wrapping_sub(self.used_seen);
            assert!(
                have <= count,
                "queue {}: {have} used entries appeared, expected {count}",
                self.index
            );
            if have == count && interrupted {
                break;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "queue {}: {have} of {count} used entries after {DEADLINE:?}, interrupt seen: \
                 {interrupted} (used_event {}, avail idx {}, used idx {}, consumed {})",
                self.index,
                self.used_event(),
                self.vq.avail().idx().load(),
                self.used_idx(),
                self.used_seen,
            );
            std::thread::sleep(POLL);
        }
        let mut used = Vec::new();
        while self.used_seen != target {
            let e = self
                .vq
                .used()
                .ring()
                .ref_at(usize::from(self.used_seen % QUEUE_SIZE))
                .unwrap()
                .load();
            used.push(Used {
                id: e.id(),
                len: e.len(),
            });
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        used
    }

    /// Asserts that no used entry appears within `window` (for chains the device drops).
    pub fn assert_no_used(&self, window: Duration) {
        let start = Instant::now();
        while start.elapsed() < window {
            assert_eq!(
                self.used_idx(),
                self.used_seen,
                "queue {}: unexpected used entry",
                self.index
            );
            std::thread::sleep(POLL);
        }
    }

    /// Kicks, waits for the one chain `t`, and returns its completion.
    pub fn complete(&mut self, t: Ticket) -> Done {
        self.notify();
        let used = self.wait_used(1);
        assert_eq!(
            used[0].id,
            u32::from(t.head),
            "used entry for another chain"
        );
        Done {
            status: self.status(t),
            used_len: used[0].len,
        }
    }

    pub fn status(&self, t: Ticket) -> u8 {
        self.mem.read_obj(GuestAddress(t.status_addr)).unwrap()
    }

    /// Submits and completes one request.
    pub fn request(&mut self, request_type: u32, sector: u64, bufs: &[Buf]) -> Done {
        let t = self.submit(request_type, sector, bufs);
        self.complete(t)
    }

    /// Reads `len` bytes at `sector` into guest memory at `addr`; returns them.
    pub fn read(&mut self, sector: u64, addr: u64, len: u32) -> Vec<u8> {
        self.mem
            .write_slice(&vec![0xCC; len as usize], GuestAddress(addr))
            .unwrap();
        let done = self.request(T_IN, sector, &[Buf::to_guest(addr, len)]);
        assert_eq!(
            done,
            Done {
                status: S_OK,
                used_len: len + 1
            },
            "read at sector {sector}"
        );
        let mut buf = vec![0u8; len as usize];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// Writes `data` at `sector` from guest memory at `addr`.
    pub fn write(&mut self, sector: u64, addr: u64, data: &[u8]) -> Done {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        self.request(T_OUT, sector, &[Buf::from_guest(addr, data.len() as u32)])
    }

    /// A discard or write-zeroes request with one range record at `addr`.
    pub fn ranges(&mut self, request_type: u32, addr: u64, ranges: &[(u64, u32, u32)]) -> Done {
        let mut payload = Vec::new();
        for (sector, num_sectors, flags) in ranges {
            payload.extend_from_slice(&sector.to_le_bytes());
            payload.extend_from_slice(&num_sectors.to_le_bytes());
            payload.extend_from_slice(&flags.to_le_bytes());
        }
        self.mem.write_slice(&payload, GuestAddress(addr)).unwrap();
        self.request(
            request_type,
            0,
            &[Buf::from_guest(addr, payload.len() as u32)],
        )
    }
}

/// Compares two byte buffers and, unlike `assert_eq!`, reports the first difference rather
/// than printing both.
#[track_caller]
pub fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    match first {
        Some(i) => panic!(
            "{what}: byte {i} differs: got {:#04x}, want {:#04x} (lengths {} and {})",
            got[i],
            want[i],
            got.len(),
            want.len()
        ),
        None => panic!(
            "{what}: lengths differ: got {}, want {}",
            got.len(),
            want.len()
        ),
    }
}

/// `assert_eq!` for byte buffers, via [`assert_bytes`].
macro_rules! assert_bytes {
    ($got:expr, $want:expr $(,)?) => {
        $crate::common::assert_bytes(&$got, &$want, stringify!($got))
    };
    ($got:expr, $want:expr, $($fmt:tt)+) => {
        $crate::common::assert_bytes(&$got, &$want, &format!($($fmt)+))
    };
}

/// Polls `cond` until it holds or the deadline passes.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(POLL);
    }
}

/// The vhost-user dirty log: one bit per 4 KiB page of guest memory, in a memfd.
pub struct DirtyLog {
    pub file: Arc<File>,
    pub len: u64,
}

impl DirtyLog {
    pub fn new(mem_bytes: usize) -> DirtyLog {
        let pages = mem_bytes as u64 / PAGE;
        let len = pages.div_ceil(8);
        DirtyLog {
            file: Arc::new(memfd("strait-dirty-log", len)),
            len,
        }
    }

    pub fn region(&self) -> vhost::VhostUserDirtyLogRegion {
        vhost::VhostUserDirtyLogRegion {
            mmap_size: self.len,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// The pages whose bit is set, in ascending order.
    pub fn dirty_pages(&self) -> Vec<u64> {
        let mut buf = vec![0u8; self.len as usize];
        self.file.read_exact_at(&mut buf, 0).unwrap();
        let mut pages = Vec::new();
        for (i, byte) in buf.iter().enumerate() {
            for b in 0..8 {
                if byte & (1 << b) != 0 {
                    pages.push(i as u64 * 8 + b);
                }
            }
        }
        pages
    }

    pub fn clear(&self) {
        self.file
            .write_all_at(&vec![0u8; self.len as usize], 0)
            .unwrap();
    }
}

/// The pages `[addr, addr + len)` touches.
pub fn pages_of(addr: u64, len: u64) -> Vec<u64> {
    (addr / PAGE..=(addr + len - 1) / PAGE).collect()
}
