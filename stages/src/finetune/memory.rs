//! Peak resident memory of this process (Linux `/proc`), so a stage can report
//! what training actually took: the peak is reset when the stage starts.

/// Resets the kernel's peak-RSS counter (`VmHWM`) to the current RSS; a no-op
/// where `/proc/self/clear_refs` is unavailable.
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size in bytes since the last reset, if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_is_read_on_linux() {
        super::reset_peak();
        if cfg!(target_os = "linux") {
            assert!(super::peak_rss_bytes().unwrap() > 0);
        }
    }
}
