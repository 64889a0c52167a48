//! The same job on each backend, alternating, several rounds; medians, spread and the
//! strait/qsd ratio per figure.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::Serialize;

use super::job::{run_job, JobResult, JobSpec};
use super::peers::{Peer, PeerConfig, RunningPeer};

/// The figures compared, by name, as they appear in the JSON.
pub const FIGURES: &[&str] = &[
    "iops",
    "mb_per_s",
    "p50_us",
    "p99_us",
    "p999_us",
    "backend_cpu_us_per_io",
    "kicks_per_io",
    "sleeps_per_io",
    "other_cpu_s",
];

fn figure(r: &JobResult, name: &str) -> Option<f64> {
    match name {
        "iops" => Some(r.iops),
        "mb_per_s" => Some(r.mb_per_s),
        "p50_us" => Some(r.p50_us),
        "p99_us" => Some(r.p99_us),
        "p999_us" => Some(r.p999_us),
        "backend_cpu_us_per_io" => r.backend_cpu_us_per_io,
        "kicks_per_io" => Some(r.kicks_per_io),
        "sleeps_per_io" => Some(r.sleeps_per_io),
        "other_cpu_s" => r.other_cpu_s,
        _ => None,
    }
}

/// One backend over all rounds.
#[derive(Debug, Clone, Serialize)]
pub struct PeerSummary {
    /// Median over rounds of each figure.
    #[serde(flatten)]
    pub median: BTreeMap<&'static str, f64>,
    /// `[min, max]` over rounds of each figure.
    pub spread: BTreeMap<&'static str, [f64; 2]>,
    pub rounds: Vec<JobResult>,
}

/// The comparison's output.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub job: JobSpec,
    pub backends: PeerConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strait: Option<PeerSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qsd: Option<PeerSummary>,
    /// strait / qsd for each figure (both backends run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<BTreeMap<&'static str, f64>>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians and spread over `rounds`.
pub fn summarise(rounds: Vec<JobResult>) -> PeerSummary {
    let mut med = BTreeMap::new();
    let mut spread = BTreeMap::new();
    for name in FIGURES {
        let values: Vec<f64> = rounds.iter().filter_map(|r| figure(r, name)).collect();
        if values.is_empty() {
            continue;
        }
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        med.insert(*name, median(values));
        spread.insert(*name, [lo, hi]);
    }
    PeerSummary {
        median: med,
        spread,
        rounds,
    }
}

/// Runs `job` on every backend of `peers`, `rounds` times, alternating the order each round
/// (ABBA) so a slow drift of the machine does not favour either. `progress` sees each
/// round's result as it comes.
pub fn compare(
    job: &JobSpec,
    cfg: &PeerConfig,
    peers: &[Peer],
    rounds: u32,
    mut progress: impl FnMut(Peer, u32, &JobResult),
) -> Result<Comparison> {
    if peers.is_empty() || rounds == 0 {
        bail!("nothing to run: {} backends, {rounds} rounds", peers.len());
    }
    job.validate()?;
    let mut results: BTreeMap<&'static str, Vec<JobResult>> = BTreeMap::new();
    for round in 0..rounds {
        let mut order = peers.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for peer in order {
            let running = RunningPeer::start(peer, cfg, &format!("r{round}"))?;
            let result = run_job(&running.socket, job, Some(running.pid()));
            let stopped = running.stop();
            let result = result?;
            stopped?;
            progress(peer, round, &result);
            results.entry(peer.name()).or_default().push(result);
        }
    }
    let strait = results.remove("strait").map(summarise);
    let qsd = results.remove("qsd").map(summarise);
    let ratio = match (&strait, &qsd) {
        (Some(s), Some(q)) => Some(
            s.median
                .iter()
                .filter_map(|(k, sv)| q.median.get(k).map(|qv| (*k, sv / qv)))
                .collect(),
        ),
        _ => None,
    };
    Ok(Comparison {
        job: job.clone(),
        backends: cfg.clone(),
        strait,
        qsd,
        ratio,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
