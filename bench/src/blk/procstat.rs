//! CPU time of a process, from `/proc/PID/stat` (`utime + stime`, every thread of the
//! process, kernel io_uring workers included since they belong to its thread group).

use std::path::PathBuf;

use anyhow::{Context, Result};

/// A process whose CPU time can be sampled.
#[derive(Debug, Clone)]
pub struct CpuClock {
    path: PathBuf,
    ticks_per_s: f64,
}

impl CpuClock {
    pub fn for_pid(pid: u32) -> CpuClock {
        // SAFETY: sysconf only reads a configuration value.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        CpuClock {
            path: PathBuf::from(format!("/proc/{pid}/stat")),
            // Linux has reported 100 on every architecture for decades; used if sysconf fails.
            ticks_per_s: if ticks > 0 { ticks as f64 } else { 100.0 },
        }
    }

    /// CPU seconds (user + system) used so far. Resolution: one clock tick (10 ms).
    pub fn cpu_s(&self) -> Result<f64> {
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let ticks =
            parse_cpu_ticks(&text).with_context(|| format!("parsing {}", self.path.display()))?;
        Ok(ticks as f64 / self.ticks_per_s)
    }
}

/// CPU seconds the whole machine has been busy (every CPU, every process): the `cpu` line
/// of `/proc/stat` less idle and iowait. Lets a run tell how much CPU others took.
pub fn machine_busy_s() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let ticks = parse_machine_busy(&text).context("parsing /proc/stat")?;
    // SAFETY: sysconf only reads a configuration value.
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks as f64 / if per_s > 0 { per_s as f64 } else { 100.0 })
}

/// Busy ticks from the aggregate `cpu` line: user nice system idle iowait irq softirq
/// steal (guest time is already inside user).
fn parse_machine_busy(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    (v.len() == 8).then(|| v[0] + v[1] + v[2] + v[5] + v[6] + v[7])
}

/// `utime + stime` (fields 14 and 15) from a `/proc/PID/stat` line. The command name (field
/// 2) may contain spaces and parentheses, so fields are counted after its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: field 3 (state) is at index 0, so utime (14) is at index 11.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_spaces_and_parens() {
        let line = "1234 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 31 0 0 20 0 1 0";
        assert_eq!(parse_cpu_ticks(line), Some(281));
    }

    #[test]
    fn machine_busy_skips_idle_and_iowait() {
        let stat = "cpu  10 1 5 1000 7 2 3 4 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        assert_eq!(parse_machine_busy(stat), Some(10 + 1 + 5 + 2 + 3 + 4));
        assert!(machine_busy_s().expect("/proc/stat") > 0.0);
    }

    #[test]
    fn own_cpu_time_grows() {
        let clock = CpuClock::for_pid(std::process::id());
        let before = clock.cpu_s().expect("stat");
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(100) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(clock.cpu_s().expect("stat") > before);
    }
}
