//! The vhost-user control path: the `vhost` crate's frontend (the one Cloud Hypervisor
//! uses) negotiates with any vhost-user-blk backend, shares guest RAM and hands over the
//! rings. Only what both strait and qemu-storage-daemon offer is asked for, and nothing
//! backend-specific is sent (no `GET_CONFIG`: vhost 0.18's frontend hangs on a backend that
//! answers it with an empty payload).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::guest::GuestRam;
use super::ring::RingLayout;

/// virtio feature bits the generator negotiates (virtio 1.2, 6 and 5.2.3).
const VIRTIO_F_VERSION_1: u32 = 32;
const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
const VIRTIO_BLK_F_FLUSH: u32 = 9;
const VIRTIO_BLK_F_MQ: u32 = 12;
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// How long to keep retrying the connect while the backend creates its socket. Both
/// backends listen within a few hundred milliseconds of starting; 10 s only trips on one
/// that failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_RETRY: Duration = Duration::from_millis(20);

fn bit(n: u32) -> u64 {
    1u64 << n
}

/// One queue's notification pair: the driver kicks `kick`, the device signals `call`.
pub struct QueueFds {
    pub kick: EventFd,
    pub call: EventFd,
}

/// A connected, configured vhost-user-blk device.
pub struct Device {
    // Kept open for the whole job: closing the socket tells the backend to stop the rings.
    _frontend: Frontend,
    pub queues: Vec<QueueFds>,
    pub features: u64,
    pub indirect: bool,
}

fn connect_retrying(socket: &Path, queues: u16) -> Result<Frontend> {
    let start = Instant::now();
    loop {
        match Frontend::connect(socket, u64::from(queues)) {
            Ok(fe) => return Ok(fe),
            Err(err) if start.elapsed() < CONNECT_TIMEOUT => {
                let _ = err;
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(err) => {
                return Err(err).with_context(|| {
                    format!("connecting to vhost-user socket {}", socket.display())
                })
            }
        }
    }
}

impl Device {
    /// Connects to `socket`, negotiates, shares `ram` and starts one ring per `rings` entry.
    /// `want_indirect` asks for indirect descriptors (fails if the backend lacks them).
    pub fn connect(
        socket: &Path,
        ram: &GuestRam,
        rings: &[RingLayout],
        want_indirect: bool,
    ) -> Result<Device> {
        let queues = u16::try_from(rings.len()).context("too many queues")?;
        let mut fe = connect_retrying(socket, queues)?;
        fe.set_owner().context("SET_OWNER")?;
        let offered = fe.get_features().context("GET_FEATURES")?;
        let mut wanted = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VHOST_USER_F_PROTOCOL_FEATURES)
            | bit(VIRTIO_BLK_F_FLUSH);
        if want_indirect {
            wanted |= bit(VIRTIO_RING_F_INDIRECT_DESC);
        }
        if queues > 1 {
            wanted |= bit(VIRTIO_BLK_F_MQ);
        }
        if offered & wanted != wanted {
            bail!(
                "backend does not offer the features {:#x} the job needs",
                wanted & !offered
            );
        }
        let offered_protocol = fe
            .get_protocol_features()
            .context("GET_PROTOCOL_FEATURES")?;
        let protocol = offered_protocol
            & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
        fe.set_protocol_features(protocol)
            .context("SET_PROTOCOL_FEATURES")?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every setup message waits for the backend's ack: the rings are live when
            // `connect` returns.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        fe.set_features(wanted).context("SET_FEATURES")?;
        if queues > 1 {
            if !protocol.contains(VhostUserProtocolFeatures::MQ) {
                bail!("backend does not offer the MQ protocol feature; {queues} queues asked");
            }
            let max = fe.get_queue_num().context("GET_QUEUE_NUM")?;
            if max < u64::from(queues) {
                bail!("backend serves {max} queues; {queues} asked");
            }
        }
        fe.set_mem_table(&[ram.region()]).context("SET_MEM_TABLE")?;
        let mut fds = Vec::with_capacity(rings.len());
        for (i, layout) in rings.iter().enumerate() {
            let q = QueueFds {
                kick: EventFd::new(EFD_NONBLOCK).context("kick eventfd")?,
                call: EventFd::new(EFD_NONBLOCK).context("call eventfd")?,
            };
            start_ring(&mut fe, ram, i, layout, &q)
                .with_context(|| format!("starting queue {i}"))?;
            fds.push(q);
        }
        Ok(Device {
            _frontend: fe,
            queues: fds,
            features: wanted,
            indirect: want_indirect,
        })
    }
}

fn start_ring(
    fe: &mut Frontend,
    ram: &GuestRam,
    index: usize,
    layout: &RingLayout,
    q: &QueueFds,
) -> Result<()> {
    fe.set_vring_num(index, layout.size)
        .context("SET_VRING_NUM")?;
    fe.set_vring_addr(
        index,
        &VringConfigData {
            queue_max_size: layout.size,
            queue_size: layout.size,
            flags: 0,
            desc_table_addr: ram.host_addr(layout.desc),
            used_ring_addr: ram.host_addr(layout.used),
            avail_ring_addr: ram.host_addr(layout.avail),
            log_addr: None,
        },
    )
    .context("SET_VRING_ADDR")?;
    fe.set_vring_base(index, 0).context("SET_VRING_BASE")?;
    fe.set_vring_call(index, &q.call)
        .context("SET_VRING_CALL")?;
    fe.set_vring_kick(index, &q.kick)
        .context("SET_VRING_KICK")?;
    fe.set_vring_enable(index, true)
        .context("SET_VRING_ENABLE")?;
    Ok(())
}
