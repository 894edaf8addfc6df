//! What the machine itself did while an open loop ran, measured beside the system under
//! test so that a latency tail can be told apart from the broker's own work:
//! - the disk: a 4 KiB append and `fdatasync` every 50 ms to a file in the broker's store
//!   directory (so the same file system and device). A design that makes every
//!   credential durable before answering cannot answer faster than this disk syncs;
//! - the hypervisor: CPU time stolen from this VM (`steal` in `/proc/stat`), per 100 ms;
//! - the scheduler: how long the broker's threads were runnable but waiting for a CPU
//!   (the second field of `/proc/<pid>/task/*/schedstat`, summed over its threads), per
//!   100 ms. The load client shares the machine's CPUs with the broker, so a busy spell
//!   of either shows here as the broker's requests waiting to run.
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

/// Per 100 ms slot of the probed window: the slowest probe sync, the CPU time stolen
/// (summed over every CPU), and the broker's run-queue wait (summed over its threads).
#[derive(Default)]
pub struct Probed {
    pub sync_max: Vec<Duration>,
    pub steal: Vec<Duration>,
    pub runq: Vec<Duration>,
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

    pub fn total_runq(&self) -> Duration {
        self.runq.iter().sum()
    }

    /// The longest run-queue wait of the broker's threads in one slot.
    pub fn worst_runq(&self) -> Duration {
        self.runq.iter().copied().max().unwrap_or_default()
    }

    /// The slot at offset `at` seconds, as `sync S ms, steal T ms, run queue Q ms`.
    pub fn at(&self, at: f64) -> String {
        let i = (at * 10.0).round() as usize;
        let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
        format!(
            "sync {:.1} ms, steal {:.0} ms, run queue {:.1} ms",
            ms(self.sync_max.get(i)),
            ms(self.steal.get(i)),
            ms(self.runq.get(i))
        )
    }
}

/// Probes from `from` for `run`, in 100 ms slots counted from `from`; the thread ends then.
/// `broker` is the pid whose threads' run-queue wait is read.
pub fn start(dir: &Path, broker: u32, from: Instant, run: Duration) -> JoinHandle<Probed> {
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
            ..Probed::default()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let cpu = {
            let stop = stop.clone();
            std::thread::spawn(move || cpu_slots(broker, from, slots, &stop))
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
        (out.steal, out.runq) = cpu.join().unwrap_or_default();
        out.steal.resize(slots, Duration::ZERO);
        out.runq.resize(slots, Duration::ZERO);
        let _ = std::fs::remove_file(&path);
        out
    })
}

/// Per slot: CPU time stolen, read from the first line of /proc/stat (USER_HZ = 100),
/// and the broker's run-queue wait.
fn cpu_slots(
    broker: u32,
    from: Instant,
    slots: usize,
    stop: &AtomicBool,
) -> (Vec<Duration>, Vec<Duration>) {
    let (mut steal, mut runq) = (Vec::with_capacity(slots), Vec::with_capacity(slots));
    if let Some(wait) = from.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
    let (mut last_steal, mut last_runq) = (steal_ticks(), runq_ns(broker));
    for i in 1..=slots {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if let Some(wait) = (from + SLOT * i as u32).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let (s, q) = (steal_ticks(), runq_ns(broker));
        steal.push(Duration::from_millis(10 * s.saturating_sub(last_steal)));
        runq.push(Duration::from_nanos(q.saturating_sub(last_runq)));
        (last_steal, last_runq) = (s, q);
    }
    (steal, runq)
}

/// Nanoseconds the process's threads have spent runnable but waiting for a CPU, summed
/// (a thread that ended meanwhile drops out of the sum, hence the saturating deltas).
fn runq_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
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
