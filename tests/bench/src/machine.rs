//! The machine a run happened on, read off the machine itself: CPU, cores, RAM, the disk and file
//! system under the bench's working directory, the kernel.

use std::path::Path;
use std::process::Command;

pub fn describe(work: &Path) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let (device, fstype) = mount_of(work);
    let disk = disk_kind(&device);
    format!(
        "- CPU: {model}, {cores} cores available\n- RAM: {:.1} GiB\n- disk: {device} ({disk}), file system {fstype}, \
         bench files under {}\n- kernel: Linux {kernel}",
        mem_kib as f64 / (1 << 20) as f64,
        work.display()
    )
}

/// The device and file-system type of the mount holding `path` (the longest matching mount point).
fn mount_of(path: &Path) -> (String, String) {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String, String)> = None;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 3 || !path.starts_with(f[1]) {
            continue;
        }
        if best.as_ref().is_none_or(|(n, _, _)| f[1].len() >= *n) {
            best = Some((f[1].len(), f[0].to_string(), f[2].to_string()));
        }
    }
    best.map_or(("unknown".into(), "unknown".into()), |(_, d, t)| (d, t))
}

/// Rotational or not, and the model, from sysfs; `lsblk` is not needed.
fn disk_kind(device: &str) -> String {
    let name = device.trim_start_matches("/dev/");
    // A partition (vda1, nvme0n1p2) belongs to its parent block device.
    let mut block = name.to_string();
    if !Path::new(&format!("/sys/block/{block}")).exists() {
        if let Ok(entries) = std::fs::read_dir("/sys/block") {
            for e in entries.flatten() {
                let parent = e.file_name().to_string_lossy().to_string();
                if name.starts_with(&parent) {
                    block = parent;
                }
            }
        }
    }
    let read = |f: &str| {
        std::fs::read_to_string(format!("/sys/block/{block}/{f}"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let rotational = match read("queue/rotational").as_str() {
        "0" => "non-rotational",
        "1" => "rotational",
        _ => "rotational: unknown",
    };
    let kind = if block.starts_with("vd") {
        "virtio block device"
    } else if block.starts_with("nvme") {
        "NVMe"
    } else if block.starts_with("mmcblk") {
        "eMMC/SD"
    } else {
        "block device"
    };
    let model = read("device/model");
    let size_gib = read("size").parse::<u64>().unwrap_or(0) as f64 * 512.0 / (1u64 << 30) as f64;
    let mut s = format!("{kind}, {rotational}, {size_gib:.0} GiB");
    if !model.is_empty() {
        s.push_str(&format!(", model {model}"));
    }
    s
}

/// `uname -m` of the machine, for the binary-size row.
pub fn arch() -> String {
    Command::new("uname")
        .arg("-m")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
