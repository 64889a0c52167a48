//! The system calls the emulator needs, each wrapped once: the monotonic clock, absolute
//! sleeps, TUN devices, an eventfd to stop the readers, and entering a network namespace.
//! All of the emulator's `unsafe` lives here.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::path::NS_PER_S;

/// Nanoseconds on `CLOCK_MONOTONIC`, the clock `clock_nanosleep` sleeps on.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux,
    // so the call cannot fail (and if it did, `ts` stays zeroed, which is still a time).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(NS_PER_S).saturating_add(nanos)
}

/// Sleeps until `CLOCK_MONOTONIC` reads `deadline_ns`. An absolute deadline does not
/// accumulate the error of computing a relative one, and a signal just resumes the sleep.
pub(crate) fn sleep_until_ns(deadline_ns: u64) {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(deadline_ns / NS_PER_S).unwrap_or(libc::time_t::MAX),
        // Below 10^9, so it fits any c_long.
        tv_nsec: (deadline_ns % NS_PER_S) as libc::c_long,
    };
    loop {
        // SAFETY: `ts` is a valid timespec; the remaining-time pointer may be null with
        // TIMER_ABSTIME. The call only sleeps.
        let rc = unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_MONOTONIC,
                libc::TIMER_ABSTIME,
                &ts,
                std::ptr::null_mut(),
            )
        };
        // clock_nanosleep returns the error number instead of setting errno.
        if rc != libc::EINTR {
            return;
        }
    }
}

/// Asks the kernel to wake this thread on time: the default timer slack of 50 µs would add
/// up to that much to every release.
pub(crate) fn set_timer_slack_ns(slack_ns: u64) -> io::Result<()> {
    let slack = libc::c_ulong::try_from(slack_ns).unwrap_or(libc::c_ulong::MAX);
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, slack, 0, 0, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel id of the calling thread, to find its CPU time in `/proc/self/task`.
pub(crate) fn thread_id() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Moves the calling thread into the network namespace bound at `ns_path`. Only this
/// thread moves: sockets and devices it creates afterwards belong to that namespace.
pub(crate) fn enter_netns(ns_path: &Path) -> io::Result<()> {
    let file = File::open(ns_path)?;
    // SAFETY: `file` is an open namespace file for the duration of the call; setns only
    // changes this thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates the TUN device `name` (layer 3, no packet-information header, a virtio-net
/// header on every packet) in the calling thread's network namespace, and offers checksum
/// and IPv4 TCP segmentation offload (see `gso`). The device lives as long as the returned
/// fd, which is non-blocking so a reader can drain it and then poll. The flag says whether
/// the offload was accepted; without it the device still works, one packet at a time.
pub(crate) fn open_tun(name: &str) -> io::Result<(OwnedFd, bool)> {
    let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let raw = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just returned by open and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain data for which all-zero bytes are a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let name_bytes = name.as_bytes();
    if name_bytes.len() >= ifr.ifr_name.len() || name_bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(name_bytes) {
        *dst = src as libc::c_char;
    }
    // IFF_TUN and IFF_NO_PI both fit in the short the union member holds.
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is, and `fd` is an
    // open /dev/net/tun descriptor.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let offloads = libc::c_ulong::from(libc::TUN_F_CSUM | libc::TUN_F_TSO4);
    // SAFETY: TUNSETOFFLOAD takes its flags by value and touches no memory.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, offloads) };
    Ok((fd, rc == 0))
}

/// Reads one packet. `Ok(None)` means the (non-blocking) device has nothing queued.
pub(crate) fn read_packet(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            // Non-negative and at most buf.len().
            return Ok(Some(n as usize));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(err),
        }
    }
}

/// Injects one packet into the device's network stack.
pub(crate) fn write_packet(fd: RawFd, packet: &[u8]) -> io::Result<()> {
    loop {
        // SAFETY: `packet` is valid for reads of `packet.len()` bytes for the whole call.
        let n = unsafe { libc::write(fd, packet.as_ptr().cast(), packet.len()) };
        if n >= 0 {
            // A TUN write takes the whole packet or fails.
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// An eventfd that, once signalled, stays readable: every poller sees the stop.
pub(crate) struct StopEvent {
    fd: OwnedFd,
}

impl StopEvent {
    pub(crate) fn new() -> io::Result<StopEvent> {
        // SAFETY: eventfd takes no pointers.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` was just returned by eventfd and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(StopEvent { fd })
    }

    pub(crate) fn signal(&self) -> io::Result<()> {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one`, which live for the whole call.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until `fd` is readable, the stop event is signalled, or `timeout_ms` passes.
    pub(crate) fn poll_with(&self, fd: RawFd, timeout_ms: i32) -> io::Result<()> {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the whole call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        Ok(())
    }
}

/// CPU time (user + system) used so far by thread `tid` of this process, from
/// `/proc/self/task/TID/stat`; `None` once the thread is gone.
pub(crate) fn thread_cpu_ms(tid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // utime and stime are fields 14 and 15; `after_name` starts at field 3.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf takes no pointers.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks_per_s = u64::try_from(ticks_per_s).ok().filter(|&t| t > 0)?;
    Some((utime + stime) * 1000 / ticks_per_s)
}

/// Set by the stop-signal handler, read by `run_cli`'s wait loop.
static STOP_SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP_SIGNALLED.store(true, Ordering::SeqCst);
}

/// Catches SIGINT and SIGTERM for as long as it lives, so that Ctrl-C ends a run through
/// the normal cleanup; the previous handlers come back on drop.
pub(crate) struct StopSignals {
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

impl StopSignals {
    pub(crate) fn install() -> Result<StopSignals, (libc::c_int, io::Error)> {
        STOP_SIGNALLED.store(false, Ordering::SeqCst);
        let mut guard = StopSignals {
            previous: Vec::new(),
        };
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: sigaction is plain data for which all-zero bytes are valid.
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            // SAFETY: `action.sa_mask` is a valid sigset_t to initialise.
            unsafe { libc::sigemptyset(&mut action.sa_mask) };
            // SAFETY: as above, all-zero is a valid sigaction to receive the old one.
            let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: both pointers are valid sigaction structs; the handler only does an
            // atomic store, which is async-signal-safe.
            let rc = unsafe { libc::sigaction(signal, &action, &mut previous) };
            if rc < 0 {
                return Err((signal, io::Error::last_os_error()));
            }
            guard.previous.push((signal, previous));
        }
        Ok(guard)
    }

    /// Whether SIGINT or SIGTERM arrived since `install`.
    pub(crate) fn fired(&self) -> bool {
        STOP_SIGNALLED.load(Ordering::SeqCst)
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        for (signal, previous) in self.previous.drain(..) {
            // SAFETY: `previous` is the action sigaction returned for this signal.
            unsafe { libc::sigaction(signal, &previous, std::ptr::null_mut()) };
        }
    }
}

/// Sends `signal` to every process of process group `pgid`.
pub(crate) fn kill_group(pgid: u32, signal: libc::c_int) -> io::Result<()> {
    let pgid = libc::pid_t::try_from(pgid).map_err(io::Error::other)?;
    // SAFETY: kill takes no pointers; a negative pid addresses the group.
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_until_reaches_the_deadline() {
        let start = monotonic_ns();
        sleep_until_ns(start + 2_000_000);
        assert!(monotonic_ns() >= start + 2_000_000);
    }

    #[test]
    fn own_thread_cpu_time_is_readable() {
        assert!(thread_cpu_ms(thread_id()).is_some());
    }
}
