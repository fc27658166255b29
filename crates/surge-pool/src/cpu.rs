//! CPU used by instances: each instance's process and everything it started, from /proc.

use std::collections::HashMap;

/// Seconds of CPU used so far by `roots` and all their descendants.
pub(crate) fn process_tree_seconds(roots: &[u32]) -> f64 {
    if roots.is_empty() {
        return 0.0;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0.0 };
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut ticks: HashMap<u32, u64> = HashMap::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        if let Some((parent, used)) = parse_stat(&stat) {
            children.entry(parent).or_default().push(pid);
            ticks.insert(pid, used);
        }
    }
    let mut total = 0;
    let mut pending: Vec<u32> = roots.to_vec();
    while let Some(pid) = pending.pop() {
        total += ticks.get(&pid).copied().unwrap_or(0);
        pending.extend(children.get(&pid).into_iter().flatten());
    }
    total as f64 / crate::process::clock_ticks_per_second()
}

/// (parent pid, user + system ticks) from a `/proc/PID/stat` line. The command name, in
/// parentheses, may itself hold spaces and parentheses: fields are counted after the last ')'.
fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    let parent = fields.get(1)?.parse().ok()?;
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some((parent, user + system))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names() {
        let stat = "4242 (my (odd) proc) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0 5 1 1";
        assert_eq!(parse_stat(stat), Some((17, 325)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(process_tree_seconds(&[std::process::id()]) > 0.0);
        assert_eq!(process_tree_seconds(&[]), 0.0);
    }
}
