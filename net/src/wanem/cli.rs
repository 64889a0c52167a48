//! `strait wanem`: start the emulator, run a command on each side, report, clean up.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::sys::{self, StopSignals};
use super::{Wanem, WanemConfig, WanemError};
use std::os::unix::process::CommandExt;

/// How often the wait loop looks at the children, the deadline and the stop signals: a
/// Ctrl-C is answered within this time.
const WAIT_POLL: Duration = Duration::from_millis(50);

/// A command still running at the end gets SIGTERM, then SIGKILL after this long: enough
/// for a well-behaved tool (iperf3, a test binary) to print its summary.
const CHILD_TERM_GRACE: Duration = Duration::from_secs(2);

/// Longest `seconds` accepted: a week, longer than any soak test.
const SECONDS_MAX: f64 = 7.0 * 86_400.0;

/// One command running inside a namespace, in its own process group so that stopping it
/// also stops whatever it started (the namespace outlives nothing that runs in it).
struct Side {
    namespace: String,
    command: String,
    child: Child,
    /// Set once the child has exited by itself.
    exited: Option<ExitStatus>,
}

/// What `strait wanem` does: starts the emulator, prints the namespaces and addresses,
/// runs `run_a` in namespace A and `run_b` in B (with `sh -c`), and waits until they have
/// exited, `seconds` have passed (if above 0), or SIGINT/SIGTERM arrives; with neither
/// command nor `seconds` it waits for the signal. Then it stops what still runs, prints the
/// statistics and deletes the namespaces. A command that exits with a failure by itself
/// makes the whole run fail (after the cleanup).
#[allow(
    clippy::print_stdout,
    reason = "this is the body of the `strait wanem` command; stdout is its interface"
)]
pub fn run_cli(
    config: WanemConfig,
    run_a: Option<String>,
    run_b: Option<String>,
    seconds: f64,
) -> Result<(), WanemError> {
    if !(0.0..=SECONDS_MAX).contains(&seconds) {
        return Err(WanemError::InvalidConfig {
            reason: format!("seconds {seconds} is not in 0..={SECONDS_MAX}"),
        });
    }
    // Installed before the namespaces exist, so no Ctrl-C can skip their cleanup.
    let signals =
        StopSignals::install().map_err(|(signal, source)| WanemError::Signal { signal, source })?;
    let wanem = Wanem::start(config)?;
    println!(
        "wanem: A = {} ({}), B = {} ({})",
        wanem.namespace_a(),
        wanem.addr_a(),
        wanem.namespace_b(),
        wanem.addr_b()
    );
    println!("wanem: config {:?}", wanem.config());
    let mut sides = Vec::new();
    let spawned = spawn_sides(&wanem, run_a, run_b, &mut sides);
    let outcome = spawned.and_then(|()| wait(&signals, &mut sides, seconds));
    for side in &mut sides {
        terminate(side);
    }
    println!("wanem: stats\n{}", wanem.stats());
    wanem.stop();
    outcome?;
    for side in sides {
        if let Some(status) = side.exited.filter(|status| !status.success()) {
            return Err(WanemError::ChildFailed {
                namespace: side.namespace,
                command: side.command,
                status,
            });
        }
    }
    Ok(())
}

#[allow(
    clippy::print_stdout,
    reason = "part of the `strait wanem` command's output"
)]
fn spawn_sides(
    wanem: &Wanem,
    run_a: Option<String>,
    run_b: Option<String>,
    sides: &mut Vec<Side>,
) -> Result<(), WanemError> {
    for (command, namespace) in [(run_a, wanem.namespace_a()), (run_b, wanem.namespace_b())] {
        let Some(command) = command else {
            continue;
        };
        println!("wanem: running in {namespace}: {command}");
        let child = super::command_in(namespace, "sh")
            .arg("-c")
            .arg(&command)
            .process_group(0)
            .spawn()
            .map_err(|source| WanemError::Spawn {
                command: format!("ip netns exec {namespace} sh -c {command:?}"),
                source,
            })?;
        sides.push(Side {
            namespace: namespace.to_string(),
            command,
            child,
            exited: None,
        });
    }
    Ok(())
}

/// Waits for the first of: every command exited, the deadline, a stop signal.
fn wait(signals: &StopSignals, sides: &mut [Side], seconds: f64) -> Result<(), WanemError> {
    let deadline = (seconds > 0.0).then(|| Instant::now() + Duration::from_secs_f64(seconds));
    loop {
        if signals.fired() {
            info!("stop signal received");
            return Ok(());
        }
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return Ok(());
        }
        for side in sides.iter_mut().filter(|side| side.exited.is_none()) {
            side.exited = side.child.try_wait().map_err(|source| WanemError::Wait {
                namespace: side.namespace.clone(),
                command: side.command.clone(),
                source,
            })?;
        }
        if !sides.is_empty() && sides.iter().all(|side| side.exited.is_some()) {
            return Ok(());
        }
        std::thread::sleep(WAIT_POLL);
    }
}

/// Stops a command that is still running: SIGTERM to its group, SIGKILL after the grace.
fn terminate(side: &mut Side) {
    if side.exited.is_some() {
        return;
    }
    let pgid = side.child.id();
    for (signal, grace) in [
        (libc::SIGTERM, CHILD_TERM_GRACE),
        (libc::SIGKILL, CHILD_TERM_GRACE),
    ] {
        if let Err(err) = sys::kill_group(pgid, signal) {
            warn!(namespace = %side.namespace, command = %side.command, error = %err, "cannot signal command");
        }
        let until = Instant::now() + grace;
        while Instant::now() < until {
            match side.child.try_wait() {
                Ok(Some(status)) => {
                    info!(namespace = %side.namespace, command = %side.command, %status, "command stopped");
                    return;
                }
                Ok(None) => std::thread::sleep(WAIT_POLL),
                Err(err) => {
                    warn!(namespace = %side.namespace, command = %side.command, error = %err, "cannot wait for command");
                    return;
                }
            }
        }
    }
    warn!(namespace = %side.namespace, command = %side.command, "command did not stop");
}
