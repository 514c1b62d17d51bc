//! What the benchmark reads from /proc: CPU time, resident memory, listening ports.

use std::{collections::HashSet, time::Instant};

/// Linux reports utime/stime in USER_HZ, which is 100 on every architecture it runs on.
const TICKS_PER_SEC: f64 = 100.0;

/// utime + stime of a process (`"self"` or a pid), in seconds.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SEC)
}

/// Time core `core` was not idle (user, nice, system, irq, softirq, steal), in seconds.
pub fn core_busy_seconds(core: usize) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&format!("cpu{core}")))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = v.iter().take(8).sum::<u64>() - v.get(3)? - v.get(4)?;
    Some(busy as f64 / TICKS_PER_SEC)
}

/// A `VmRSS`/`VmHWM`-style line of /proc/PID/status, in KiB.
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// TCP ports a process listens on (IPv4 and IPv6), found through its socket inodes.
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let mut inodes = HashSet::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in dir.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path()) {
                let target = target.to_string_lossy();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address rem_address st ... inode is field 9.
            if f.len() > 9
                && f[3] == "0A"
                && inodes.contains(f[9])
                && let Some(port) = f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                ports.push(port);
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// CPU share of a process over an interval: start a meter, read it later.
#[derive(Clone)]
pub struct CpuMeter {
    pid: String,
    core: usize,
    at: Instant,
    cpu: f64,
    core_busy: f64,
}

impl CpuMeter {
    /// `pid` runs pinned to `core`.
    pub fn start(pid: &str, core: usize) -> Self {
        Self {
            pid: pid.to_string(),
            core,
            at: Instant::now(),
            cpu: cpu_seconds(pid).unwrap_or(0.0),
            core_busy: core_busy_seconds(core).unwrap_or(0.0),
        }
    }

    /// Share of the process's core used by everything else (other processes, interrupts,
    /// hypervisor steal) since `start`: high on a noisy machine.
    pub fn others_share(&self) -> f64 {
        let wall = self.at.elapsed().as_secs_f64();
        let busy = core_busy_seconds(self.core).unwrap_or(self.core_busy) - self.core_busy;
        let own = cpu_seconds(&self.pid).unwrap_or(self.cpu) - self.cpu;
        if wall > 0.0 {
            ((busy - own) / wall).max(0.0)
        } else {
            0.0
        }
    }

    /// Fraction of one core used since `start` (1.0 = one core busy all the time).
    pub fn share(&self) -> f64 {
        let wall = self.at.elapsed().as_secs_f64();
        let cpu = cpu_seconds(&self.pid).unwrap_or(self.cpu) - self.cpu;
        if wall > 0.0 { cpu / wall } else { 0.0 }
    }
}

/// CPU seconds used so far by this process's live threads whose name starts with `prefix`
/// (Linux keeps the first 15 bytes of a thread's name).
pub fn threads_cpu_seconds(prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| name.starts_with(prefix))
        })
        .filter_map(|task| {
            cpu_seconds(&format!("self/task/{}", task.file_name().to_string_lossy()))
        })
        .sum()
}
