//! qemu-storage-daemon as a vhost-user-blk backend: the reference implementation the tests
//! hold strait's backend up against.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::guest::QSD_BINARY;
use super::process::{kill_and_reap, kill_with_parent, wait_for_socket};
use super::HarnessError;

/// How long a backend may take to create its listening socket. qsd needs about 50 ms; the
/// margin covers a machine busy compiling and running TCG guests on both cores.
pub const SOCKET_WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`StorageDaemon::start`] exports.
#[derive(Clone, Debug)]
pub struct QsdConfig {
    pub image: PathBuf,
    pub socket: PathBuf,
    pub writable: bool,
    pub num_queues: u16,
    /// Pass guest discards on to the image as hole punches (`discard=unmap`).
    pub discard: bool,
    pub logical_block_size: Option<u32>,
}

impl QsdConfig {
    /// A writable, single-queue export of the raw `image` on `socket`, with discard on.
    pub fn new(image: &Path, socket: &Path) -> Self {
        QsdConfig {
            image: image.to_owned(),
            socket: socket.to_owned(),
            writable: true,
            num_queues: 1,
            discard: true,
            logical_block_size: None,
        }
    }

    pub fn read_only(mut self) -> Self {
        self.writable = false;
        self
    }

    pub fn num_queues(mut self, num_queues: u16) -> Self {
        self.num_queues = num_queues;
        self
    }

    fn args(&self) -> Vec<String> {
        let read_only = if self.writable { "off" } else { "on" };
        let discard = if self.discard { "unmap" } else { "ignore" };
        let mut export = format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},\
             writable={},num-queues={}",
            self.socket.display(),
            if self.writable { "on" } else { "off" },
            self.num_queues,
        );
        if let Some(size) = self.logical_block_size {
            export.push_str(&format!(",logical-block-size={size}"));
        }
        vec![
            "--blockdev".into(),
            // cache.direct=off: the host reads the image through the page cache right after
            // the guest wrote it; qsd's writes are visible there without a flush.
            format!(
                "driver=file,node-name=file0,filename={},cache.direct=off,read-only={read_only},\
                 discard={discard}",
                self.image.display()
            ),
            "--blockdev".into(),
            format!(
                "driver=raw,node-name=disk0,file=file0,read-only={read_only},discard={discard}"
            ),
            "--export".into(),
            export,
        ]
    }
}

/// A running qemu-storage-daemon, killed on drop.
pub struct StorageDaemon {
    child: Child,
    log: PathBuf,
}

impl StorageDaemon {
    /// Starts qsd with its output in `<log_dir>/qsd.log` and waits until its socket listens.
    pub fn start(config: &QsdConfig, log_dir: &Path) -> Result<Self, HarnessError> {
        let log = log_dir.join("qsd.log");
        let log_file = File::create(&log).map_err(|e| HarnessError::io("create", &log, e))?;
        let log_clone = log_file
            .try_clone()
            .map_err(|e| HarnessError::io("duplicate", &log, e))?;
        let child = kill_with_parent(
            Command::new(QSD_BINARY)
                .args(config.args())
                .stdin(Stdio::null())
                .stdout(log_file)
                .stderr(log_clone),
        )
        .spawn()
        .map_err(|source| HarnessError::Spawn {
            program: QSD_BINARY.into(),
            source,
        })?;
        let mut daemon = StorageDaemon { child, log };
        wait_for_socket(
            &config.socket,
            &mut daemon.child,
            QSD_BINARY,
            Some(&daemon.log),
            SOCKET_WAIT_TIMEOUT,
        )?;
        Ok(daemon)
    }

    /// What qsd printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}
