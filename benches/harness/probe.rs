//! What the machine itself did while an open loop ran, measured beside the system under
//! test so that a latency tail can be told apart from the broker's own work:
//! - the disk: a 4 KiB append and `fdatasync` every 50 ms to a file in the broker's store
//!   directory (so the same file system and device). A design that makes every
//!   credential durable before answering cannot answer faster than this disk syncs;
//! - the hypervisor: CPU time stolen from this VM (`steal` in `/proc/stat`), per 100 ms.
//!
//! The probe's own load is small (20 syncs/s beside the broker's hundreds of commits/s).

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SYNC_EVERY: Duration = Duration::from_millis(50);
const SLOT: Duration = Duration::from_millis(100);

/// Per 100 ms slot of the probed window: the slowest probe sync, and the CPU time stolen
/// (summed over every CPU).
#[derive(Default)]
pub struct Probed {
    pub sync_max: Vec<Duration>,
    pub steal: Vec<Duration>,
}

impl Probed {
    /// The slowest probe sync over the window.
    pub fn worst_sync(&self) -> Duration {
        self.sync_max.iter().copied().max().unwrap_or_default()
    }

    /// Slots whose probe sync took over `over`.
    pub fn slow_syncs(&self, over: Duration) -> usize {
        self.sync_max.iter().filter(|d| **d > over).count()
    }

    pub fn total_steal(&self) -> Duration {
        self.steal.iter().sum()
    }

    /// The most CPU time stolen in one slot.
    pub fn worst_steal(&self) -> Duration {
        self.steal.iter().copied().max().unwrap_or_default()
    }

    /// The slot at offset `at` seconds, as `sync S ms, steal T ms`.
    pub fn at(&self, at: f64) -> String {
        let i = (at * 10.0).round() as usize;
        let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
        format!(
            "sync {:.1} ms, steal {:.0} ms",
            ms(self.sync_max.get(i)),
            ms(self.steal.get(i))
        )
    }
}

/// Probes from `from` for `run`, in 100 ms slots counted from `from`; the thread ends then.
pub fn start(dir: &Path, from: Instant, run: Duration) -> JoinHandle<Probed> {
    let path = dir.join("probe.sync");
    std::thread::spawn(move || {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("probe file");
        let slots = (run.as_millis() / SLOT.as_millis()) as usize;
        let mut out = Probed {
            sync_max: vec![Duration::ZERO; slots],
            steal: vec![Duration::ZERO; slots],
        };
        let stop = Arc::new(AtomicBool::new(false));
        let steal = {
            let stop = stop.clone();
            std::thread::spawn(move || steal_slots(from, slots, &stop))
        };
        let block = [0x5a_u8; 4096];
        let mut next = from;
        while next < from + run {
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let t0 = Instant::now();
            file.write_all(&block).expect("probe write");
            file.sync_data().expect("probe fdatasync");
            let took = t0.elapsed();
            if let Some(i) = t0
                .checked_duration_since(from)
                .map(|d| (d.as_millis() / SLOT.as_millis()) as usize)
                && let Some(m) = out.sync_max.get_mut(i)
            {
                *m = (*m).max(took);
            }
            next += SYNC_EVERY;
        }
        stop.store(true, Ordering::Relaxed);
        out.steal = steal.join().unwrap_or_default();
        out.steal.resize(slots, Duration::ZERO);
        let _ = std::fs::remove_file(&path);
        out
    })
}

/// CPU time stolen per slot, read from the first line of /proc/stat (USER_HZ = 100).
fn steal_slots(from: Instant, slots: usize, stop: &AtomicBool) -> Vec<Duration> {
    let mut out = Vec::with_capacity(slots);
    if let Some(wait) = from.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
    let mut last = steal_ticks();
    for i in 1..=slots {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if let Some(wait) = (from + SLOT * i as u32).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let now = steal_ticks();
        out.push(Duration::from_millis(10 * now.saturating_sub(last)));
        last = now;
    }
    out
}

fn steal_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(8))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
