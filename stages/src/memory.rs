//! Memory: the peak resident memory of this process (Linux `/proc`), so a
//! stage can report what its work actually took (the peak is reset when the
//! stage starts); what the machine has free; and what a training pass will
//! take, so that sizes a user set are refused before anything is allocated.

use crate::llm::ModelConfig;

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

/// Bytes this process may still allocate: `MemAvailable`, capped by the
/// cgroup's `memory.max` less its `memory.current` where there is a limit.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let available = line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024;
    let read = |name: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{name}")).ok()?.trim().parse::<u64>().ok();
    match (read("memory.max"), read("memory.current")) {
        (Some(max), Some(current)) => Some(available.min(max.saturating_sub(current))),
        _ => Some(available),
    }
}

/// Bytes in GiB, for messages.
pub fn gib(bytes: f64) -> f64 {
    bytes / (1u64 << 30) as f64
}

/// About how many bytes autograd keeps per token of a training pass: per
/// layer the norms' inputs and outputs, q/k/v before and after RoPE, the
/// attention probabilities over `tokens` keys, the MLP's three
/// intermediates and the adapters' dropout masks, in f32 (with activation
/// checkpointing, one layer's worth plus every layer's input). An estimate
/// for refusing sizes that cannot fit, not a prediction.
pub fn activation_bytes_per_token(c: &ModelConfig, tokens: usize, checkpointing: bool) -> u64 {
    let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
    let (q, kv) = ((c.num_heads * c.head_dim) as u64, (c.num_kv_heads * c.head_dim) as u64);
    let layer = 6 * h + 4 * q + 3 * kv + c.num_heads as u64 * tokens as u64 + 4 * i;
    let layers = c.num_layers as u64;
    let floats = if checkpointing { layer + layers * h } else { layers * layer };
    4 * floats
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_is_read_on_linux() {
        super::reset_peak();
        if cfg!(target_os = "linux") {
            assert!(super::peak_rss_bytes().unwrap() > 0);
            assert!(super::available_bytes().unwrap() > 0);
        }
    }
}
