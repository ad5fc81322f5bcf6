#[allow(unused_imports)]
use super::*;

/// What a process holds, read from `/proc`: open descriptors, resident memory, and its TCP
/// sockets stuck in CLOSE_WAIT (the peer closed, the process never did).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSample {
    pub fds: usize,
    pub rss_kib: u64,
    pub close_wait: usize,
}

impl ProcSample {
    pub fn of(pid: u32) -> ProcSample {
        let links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|p| p.display().to_string())
            .collect();
        let inodes: std::collections::HashSet<String> = links
            .iter()
            .filter_map(|l| l.strip_prefix("socket:[")?.strip_suffix(']'))
            .map(str::to_string)
            .collect();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        // /proc/<pid>/net/tcp*: `sl local rem st ... uid timeout inode`; st 08 is CLOSE_WAIT.
        let close_wait = ["tcp", "tcp6"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).ok())
            .flat_map(|t| {
                t.lines()
                    .skip(1)
                    .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
                    .collect::<Vec<_>>()
            })
            .filter(|f| f.len() > 9 && f[3] == "08" && inodes.contains(&f[9]))
            .count();
        ProcSample {
            fds: links.len(),
            rss_kib,
            close_wait,
        }
    }
}

/// The names of a process's threads (`/proc/<pid>/task/*/comm`, at most 15 bytes each). A thread
/// spawned without a name carries the process's own.
pub fn thread_names(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    names.sort();
    names
}

/// Context switches (voluntary and not) of the process's thread named `name` so far: how often
/// it woke up.
pub fn thread_wakeups(pid: u32, name: &str) -> u64 {
    let task = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .unwrap_or_else(|| panic!("no thread {name} in process {pid}"));
    let status = std::fs::read_to_string(task.path().join("status")).unwrap();
    status
        .lines()
        .filter(|l| {
            l.starts_with("voluntary_ctxt_switches") || l.starts_with("nonvoluntary_ctxt_switches")
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}
