//! The vhost-user control path: the `vhost` crate's frontend (the one Cloud Hypervisor
//! uses) negotiates with any vhost-user-blk backend, shares guest RAM and hands over the
//! rings. Only what both strait and qemu-storage-daemon offer is asked for, and nothing
//! backend-specific is sent (no `GET_CONFIG`: vhost 0.18's frontend hangs on a backend that
//! answers it with an empty payload).
//!
//! The connection ends with a hang-up the backend has acknowledged ([`Device::disconnect`]):
//! the frontend shuts down its sending side and waits for the backend to close the socket, so
//! a backend stopped right afterwards has no client left. qemu-storage-daemon 7.2 deadlocks on
//! exit while a client is still connected to an export in an iothread (fixed in QEMU 8.0 by
//! 2957dc40a, "only acquire AioContext once for vhost_user_server_stop()"), and it learns of
//! a plain `close` only later, in that iothread.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
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
/// How long the backend may take to close its end after the hang-up. Both backends do it
/// within milliseconds; 5 s only trips on one that stopped serving the socket.
pub const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Read size while waiting for the backend's end-of-file. The backend sends nothing unasked,
/// so anything read then is a stray reply and is discarded.
const DRAIN_BYTES: usize = 256;

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
    // Invariant: Some until the hang-up (`disconnect`, or drop on an error path).
    frontend: Option<Frontend>,
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
            frontend: Some(fe),
            queues: fds,
            features: wanted,
            indirect: want_indirect,
        })
    }

    /// Hangs up and waits until the backend has closed its end of the socket. Call it once
    /// every request has completed: the backend then stops the rings with nothing in flight.
    pub fn disconnect(mut self) -> Result<()> {
        self.hang_up()
    }

    fn hang_up(&mut self) -> Result<()> {
        let Some(frontend) = self.frontend.take() else {
            return Ok(());
        };
        // `frontend` is dropped (our end closed) only after the backend has closed its own.
        wait_for_backend_close(frontend.as_raw_fd())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // An error path still hangs up cleanly, so stopping the backend afterwards does not
        // hang and hide the error that ended the job. A failed hang-up shows there instead.
        let _ = self.hang_up();
    }
}

/// Shuts down the sending side of the vhost-user socket `fd` and waits, up to
/// `DISCONNECT_TIMEOUT`, for the backend's end-of-file: it reads the shutdown as the
/// frontend leaving, tears the device down and closes its end.
fn wait_for_backend_close(fd: RawFd) -> Result<()> {
    // SAFETY: `fd` is the frontend's socket, open for the whole call (the caller owns it).
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("shutting down the vhost-user socket (fd {fd})"));
    }
    let deadline = Instant::now() + DISCONNECT_TIMEOUT;
    let mut buf = [0u8; DRAIN_BYTES];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "the backend kept the vhost-user connection open {DISCONNECT_TIMEOUT:?} \
                 after the frontend hung up"
            );
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: `pfd` is a valid pollfd for the duration of the call; count 1.
        if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err).with_context(|| format!("polling the vhost-user socket (fd {fd})"));
        }
        // SAFETY: `buf` is writable for its whole length; `fd` is open (see above).
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n == 0 {
            return Ok(());
        }
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => {}
                // Closed with our stray bytes unread: closed all the same.
                io::ErrorKind::ConnectionReset => return Ok(()),
                _ => {
                    return Err(err).with_context(|| {
                        format!("waiting for the backend to close the vhost-user socket (fd {fd})")
                    })
                }
            }
        }
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
