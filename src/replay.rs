//! `tagstream replay FILE`: ingest an NDJSON file at full speed, resumably.
//!
//! The file's byte offset is committed with every batch, so a replay killed at any moment
//! and started again continues exactly after the last committed batch.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use processor::Engine;

pub struct ReplayReport {
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: usize,
    pub elapsed: Duration,
}

pub fn replay(
    engine: &mut Engine,
    path: &Path,
    batch_size: usize,
    progress: bool,
) -> anyhow::Result<ReplayReport> {
    let canonical = path
        .canonicalize()
        .with_context(|| format!("opening {}", path.display()))?;
    let source = format!("file:{}", canonical.display());
    let mut file = File::open(&canonical).with_context(|| format!("opening {}", path.display()))?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut offset = engine.source_offset(&source)?.unwrap_or(0);
    if offset > 0 {
        eprintln!("resuming {} at byte {offset} of {total}", path.display());
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut report = ReplayReport {
        accepted: 0,
        duplicates: 0,
        rejected: 0,
        elapsed: Duration::ZERO,
    };
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(batch_size);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n > 0 {
            offset += n as u64;
            while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                line.pop();
            }
            if !line.iter().all(u8::is_ascii_whitespace) {
                batch.push(std::mem::take(&mut line));
            }
        }
        if batch.len() >= batch_size || (n == 0 && !batch.is_empty()) {
            let outcome = engine.ingest_from(&batch, Some((&source, offset)))?;
            report.accepted += outcome.accepted;
            report.duplicates += outcome.duplicates;
            report.rejected += outcome.rejected;
            for e in outcome.errors {
                *reasons.entry(e.reason).or_default() += 1;
            }
            batch.clear();
            if progress && last_progress.elapsed() >= Duration::from_secs(1) {
                last_progress = Instant::now();
                let done = report.accepted + report.duplicates + report.rejected;
                let rate = done as f64 / started.elapsed().as_secs_f64();
                let pct = if total > 0 {
                    offset as f64 * 100.0 / total as f64
                } else {
                    100.0
                };
                eprint!("\r{pct:5.1}%  {done} events  {rate:.0} events/s   ");
                let _ = std::io::stderr().flush();
            }
        }
        if n == 0 {
            break;
        }
    }
    report.elapsed = started.elapsed();
    if progress {
        eprintln!();
    }
    for (reason, count) in &reasons {
        eprintln!("rejected {count}: {reason}");
    }
    Ok(report)
}
