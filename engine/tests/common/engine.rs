//! A `strait` child process (an engine started with `strait serve ...`), its log, and its
//! control socket; killed when dropped, so a failing test leaves no engine behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Map, Value};
use strait_engine::control::ControlClient;

use super::process::{kill_with_parent, wait_for_socket};

/// An engine creates its sockets within milliseconds; 10 s covers a loaded 2-core host.
pub const ENGINE_START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Engine {
    child: Child,
    /// The control socket: the last of the sockets waited for at start.
    pub control: PathBuf,
    log: PathBuf,
}

impl Engine {
    /// Spawns `command` (stderr to `DIR/NAME.log`) and waits until every one of `sockets`
    /// exists; the last one is the control socket.
    pub fn spawn(mut command: Command, dir: &Path, name: &str, sockets: &[&Path]) -> Engine {
        let log = dir.join(format!("{name}.log"));
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("engine log"));
        let mut child = kill_with_parent(&mut command)
            .spawn()
            .expect("spawn strait");
        for socket in sockets {
            wait_for_socket(socket, &mut child, name, Some(&log), ENGINE_START_TIMEOUT)
                .expect("engine socket");
        }
        Engine {
            child,
            control: sockets[sockets.len() - 1].to_path_buf(),
            log,
        }
    }

    /// `strait serve ARGS --control DIR/NAME.sock`, once `sockets` and the control socket
    /// exist.
    pub fn serve(dir: &Path, name: &str, args: &[&std::ffi::OsStr], sockets: &[&Path]) -> Engine {
        let control = dir.join(format!("{name}.sock"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_strait"));
        command
            .arg("serve")
            .args(args)
            .arg("--control")
            .arg(&control);
        let mut all: Vec<&Path> = sockets.to_vec();
        all.push(&control);
        Engine::spawn(command, dir, name, &all)
    }

    /// One control API call; panics with the engine's log when it fails.
    pub fn call(&self, cmd: &str, args: Map<String, Value>) -> Value {
        ControlClient::connect(&self.control)
            .expect("control socket")
            .call_with_args(cmd, args)
            .unwrap_or_else(|e| panic!("{cmd}: {e}\n{}", self.log_text()))
    }

    /// The `replication` object of `status`.
    pub fn replication(&self) -> Value {
        self.call("status", Map::new())["replication"].clone()
    }

    /// The engine's process id (`ip netns exec` execs it, so it is the child's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
