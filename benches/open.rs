//! Opening a checkpoint and listing its entries: wall time and resident memory
//! added. Run by `scripts/bench.sh` (`cargo bench --bench open -- FILE`), which
//! prints it next to Python's readers on the same file.
use std::time::Instant;

use anyhow::{Context, Result};

/// A size from /proc/self/status (VmRSS, VmHWM), in bytes (Linux).
fn status(field: &str) -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field}"))?;
    let kb: u64 = line.split_whitespace().nth(1).context("VmRSS value")?.parse()?;
    Ok(kb * 1024)
}

fn main() -> Result<()> {
    let path = std::env::args().skip(1).find(|a| !a.starts_with("--")).context("usage: open FILE")?;
    let before = status("VmRSS:")?;
    let start = Instant::now();
    let store = transplant::open(&path)?;
    let bytes: u64 = store.entries().iter().map(|e| e.bytes()).sum();
    let seconds = start.elapsed().as_secs_f64();
    let added = status("VmRSS:")?.saturating_sub(before);
    println!(
        "{{\"seconds\": {seconds:.6}, \"rss_added_bytes\": {added}, \"peak_rss_bytes\": {}, \"tensors\": {}, \"bytes\": {bytes}}}",
        status("VmHWM:")?,
        store.entries().len()
    );
    Ok(())
}
