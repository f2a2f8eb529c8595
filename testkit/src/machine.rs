//! What identifies a CPU for results recorded bit for bit: f32 products by the `gemm` crate
//! block their loops by the caches' sizes, so the same job's f32 bits may differ between CPUs
//! (never between runs on one).

/// `GenuineIntel family 6 model 167, L1d 48K, L2 2048K, L3 491520K`: the vendor, family and
/// model from `/proc/cpuinfo` and the first CPU's data and unified cache sizes from sysfs;
/// `None` where either is unreadable (not Linux).
pub fn cpu_key() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let mut key = format!(
        "{} family {} model {}",
        field("vendor_id")?,
        field("cpu family")?,
        field("model")?
    );
    let caches = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    for index in 0..8 {
        let dir = caches.join(format!("index{index}"));
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .ok()
                .map(|s| s.trim().to_string())
        };
        let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size")) else {
            continue;
        };
        match kind.as_str() {
            "Data" => key.push_str(&format!(", L{level}d {size}")),
            "Unified" => key.push_str(&format!(", L{level} {size}")),
            _ => {}
        }
    }
    key.contains(", L").then_some(key)
}
