//! Datapath events that mean lost traffic, logged at warn: the counters are read every
//! [`EVERY`] and each that moved is one warning with how many packets, what it means and what
//! to do. Drops that are the Service's semantics (no endpoint, as kube-proxy's REJECT/DROP
//! rules) are counted in the metrics but not logged.
use std::time::{Duration, Instant};

use lb_common::counter;

/// How often the counters are compared.
pub const EVERY: Duration = Duration::from_secs(10);

/// The counters that mean traffic was lost through no choice of the Service, with what the
/// operator should know.
pub const LOST_TRAFFIC: [(u32, &str); 5] = [
    (
        counter::XDP_DROP_SNAT_EXHAUSTED,
        "new flows dropped: no SNAT port was free (widen --snat-ports, or fewer flows per backend)",
    ),
    (
        counter::XDP_DROP_BACKEND_MISSING,
        "packets dropped: a frontend slot points at a missing backend (a sync was interrupted; the next adoption repairs it)",
    ),
    (
        counter::SOCK_BACKEND_MISSING,
        "connections refused: a frontend slot points at a missing backend (a sync was interrupted; the next adoption repairs it)",
    ),
    (
        counter::XDP_DROP_CT_FULL,
        "packets dropped: conntrack had no room (raise --map-conntrack / conntrack.min)",
    ),
    (
        counter::TC_ERROR,
        "replies left untranslated: a tc helper failed (a malformed frame or a store the kernel refused)",
    ),
];

/// Compares successive readings of the datapath counters.
#[derive(Default)]
pub struct LostTraffic {
    last: Option<[u64; LOST_TRAFFIC.len()]>,
    at: Option<Instant>,
}

/// One warning: the counter's name, the packets since the last reading, and its meaning.
#[derive(Debug, PartialEq, Eq)]
pub struct Lost {
    pub counter: &'static str,
    pub packets: u64,
    pub meaning: &'static str,
}

impl LostTraffic {
    /// Whether a reading is due (the first at once, then every [`EVERY`]).
    pub fn due(&self, now: Instant) -> bool {
        self.at.is_none_or(|t| now.duration_since(t) >= EVERY)
    }

    /// Takes a reading (packets per counter index, summed over CPUs) and returns what moved
    /// since the previous one; the first reading is the baseline (what an earlier agent saw
    /// is not reported again).
    pub fn observe(&mut self, now: Instant, packets: &[u64]) -> Vec<Lost> {
        self.at = Some(now);
        let mut cur = [0u64; LOST_TRAFFIC.len()];
        for (c, (idx, _)) in cur.iter_mut().zip(LOST_TRAFFIC) {
            *c = packets.get(idx as usize).copied().unwrap_or(0);
        }
        let Some(prev) = self.last.replace(cur) else {
            return Vec::new();
        };
        LOST_TRAFFIC
            .iter()
            .zip(cur.iter().zip(prev))
            .filter(|(_, (c, p))| *c > p)
            .map(|((idx, meaning), (c, p))| Lost {
                counter: counter::NAMES[*idx as usize],
                packets: c - p,
                meaning,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_what_moved_once_per_reading_after_a_baseline() {
        let mut w = LostTraffic::default();
        let t0 = Instant::now();
        assert!(w.due(t0));
        let mut c = vec![0u64; counter::COUNT as usize];
        c[counter::XDP_DROP_SNAT_EXHAUSTED as usize] = 7;
        c[counter::XDP_DROP_NO_BACKEND as usize] = 100;
        assert!(
            w.observe(t0, &c).is_empty(),
            "the first reading is the baseline"
        );
        assert!(!w.due(t0 + Duration::from_secs(1)));
        assert!(w.due(t0 + EVERY));
        c[counter::XDP_DROP_SNAT_EXHAUSTED as usize] = 10;
        c[counter::XDP_DROP_NO_BACKEND as usize] = 500; // a Service without endpoints: not lost
        c[counter::TC_ERROR as usize] = 1;
        let lost = w.observe(t0 + EVERY, &c);
        assert_eq!(
            lost.iter()
                .map(|l| (l.counter, l.packets))
                .collect::<Vec<_>>(),
            [("xdp_drop_snat_exhausted", 3), ("tc_error", 1)]
        );
        assert!(w.observe(t0 + EVERY * 2, &c).is_empty(), "nothing moved");
    }
}
