//! CPU time and memory of running processes, from `/proc`, for the
//! benchmark. A process "tree" is the process and all its descendants (some
//! daemons, such as SoftEther's, fork a worker under a watchdog).

use std::process::Command;

/// The process and its descendants, parents first.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        let tasks = std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten();
        for t in tasks {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            all.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    all
}

/// User plus system CPU time of one process (all its threads), in clock
/// ticks; 0 when it is gone.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name (field 2) may hold spaces: fields count after its ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let field = |n: usize| {
        f.get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(14) + field(15)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 if that fails).
pub fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system) used so far by the trees of `pids`.
pub fn cpu_seconds(pids: &[u32], ticks_per_second: f64) -> f64 {
    let ticks: u64 = pids.iter().flat_map(|&p| tree(p)).map(cpu_ticks).sum();
    ticks as f64 / ticks_per_second
}

/// CPU seconds the whole machine has been busy (all cores: user, nice,
/// system, irq, softirq and steal from the first line of `/proc/stat`). It
/// counts what no process tree shows: iperf3, the kernel's softirq work for
/// other processes, and the underlay itself.
pub fn machine_busy_seconds(ticks_per_second: f64) -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    busy_ticks(stat.lines().next().unwrap_or("")) as f64 / ticks_per_second
}

/// Busy ticks of a `cpu ...` line of `/proc/stat`: every field but idle and
/// iowait, and not guest time (already in user).
fn busy_ticks(line: &str) -> u64 {
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| f.get(i).copied().unwrap_or(0))
        .sum()
}

/// Resident memory of the trees of `pids`: (VmRSS, VmHWM) summed, in KiB.
pub fn memory_kib(pids: &[u32]) -> (u64, u64) {
    let (mut rss, mut hwm) = (0, 0);
    for p in pids.iter().flat_map(|&p| tree(p)) {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        for line in status.lines() {
            let kib = |l: &str| -> u64 {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            if line.starts_with("VmRSS:") {
                rss += kib(line);
            } else if line.starts_with("VmHWM:") {
                hwm += kib(line);
            }
        }
    }
    (rss, hwm)
}

/// Sends SIGKILL to every descendant of `pid` (not `pid` itself), deepest
/// first, by PID.
pub fn kill_descendants(pid: u32) {
    for p in tree(pid).into_iter().skip(1).rev() {
        let _ = Command::new("kill")
            .args(["-KILL", &p.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        // Burn a little CPU so the count is not zero at tick resolution.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(cpu_seconds(&[me], ticks_per_second()) > 0.0);
        let (rss, hwm) = memory_kib(&[me]);
        assert!(rss > 0 && hwm >= rss, "rss {rss} hwm {hwm}");
    }

    #[test]
    fn busy_ticks_leave_out_idle_iowait_and_guest() {
        let line = "cpu  100 2 30 5000 40 5 6 7 50 1";
        assert_eq!(busy_ticks(line), 100 + 2 + 30 + 5 + 6 + 7);
        assert_eq!(busy_ticks("cpu  1 2 3"), 6, "old kernels have fewer fields");
        assert!(machine_busy_seconds(ticks_per_second()) > 0.0);
    }

    #[test]
    fn tree_includes_children_and_kill_descendants_ends_them() {
        let mut sh = Command::new("sh")
            .args(["-c", "sleep 30 & wait $!"])
            .spawn()
            .expect("spawn sh");
        let pid = sh.id();
        let sleeper = crate::lab::wait_for(std::time::Duration::from_secs(5), || {
            tree(pid).get(1).copied()
        })
        .expect("sh started its child");
        kill_descendants(pid);
        // `wait $!` returns (137) once the child is killed, so sh exits by itself.
        let status = sh.wait().expect("wait sh");
        assert!(!status.success(), "the killed child made wait fail");
        assert_eq!(cpu_ticks(sleeper), 0, "the child is gone");
    }
}
