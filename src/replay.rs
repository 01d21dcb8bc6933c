//! `tagstream replay FILE`: ingest an NDJSON file at full speed, resumably.
//!
//! The file's byte offset is committed with every batch, so a replay killed at any moment
//! and started again continues exactly after the last committed batch.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use anyhow::Context;

use processor::{parse_event, Engine, EventLimits, Rejection, ValidEvent};

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
    let offset = engine.source_offset(&source)?.unwrap_or(0);
    if offset > 0 {
        eprintln!("resuming {} at byte {offset} of {total}", path.display());
    }
    file.seek(SeekFrom::Start(offset))?;
    let reader = BufReader::with_capacity(1 << 20, file);
    let limits = engine.config().limits;
    // Reading and parsing run on their own thread, one batch ahead of the engine.
    let (tx, rx) = std::sync::mpsc::sync_channel::<anyhow::Result<ParsedBatch>>(2);
    let reader_thread = std::thread::spawn(move || read_batches(reader, offset, batch_size, limits, tx));
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut report = ReplayReport {
        accepted: 0,
        duplicates: 0,
        rejected: 0,
        elapsed: Duration::ZERO,
    };
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for parsed in rx {
        let ParsedBatch {
            lines,
            events,
            offset,
        } = parsed?;
        let outcome = engine.ingest_parsed(&lines, events, Some((&source, offset)))?;
        report.accepted += outcome.accepted;
        report.duplicates += outcome.duplicates;
        report.rejected += outcome.rejected;
        for e in outcome.errors {
            *reasons.entry(e.reason).or_default() += 1;
        }
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
    reader_thread.join().expect("the reader thread does not panic");
    report.elapsed = started.elapsed();
    if progress {
        eprintln!();
    }
    for (reason, count) in &reasons {
        eprintln!("rejected {count}: {reason}");
    }
    Ok(report)
}

/// Lines of the file with their parse results, and the byte offset just after them.
struct ParsedBatch {
    lines: Vec<Vec<u8>>,
    events: Vec<Result<ValidEvent, Rejection>>,
    offset: u64,
}

/// Reads the file from `offset` in batches of non-blank lines and parses them; the
/// future-`ts` check is left to the engine, which knows its clock.
fn read_batches(
    mut reader: impl BufRead,
    mut offset: u64,
    batch_size: usize,
    limits: EventLimits,
    tx: SyncSender<anyhow::Result<ParsedBatch>>,
) {
    let mut lines: Vec<Vec<u8>> = Vec::with_capacity(batch_size);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match reader.read_until(b'\n', &mut line) {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.send(Err(anyhow::Error::new(e).context("reading the replay file")));
                return;
            }
        };
        offset += n as u64;
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        if !line.iter().all(u8::is_ascii_whitespace) {
            lines.push(std::mem::take(&mut line));
        }
        if lines.len() >= batch_size || (n == 0 && !lines.is_empty()) {
            let events = lines.iter().map(|l| parse_event(l, &limits, i64::MAX)).collect();
            let batch = ParsedBatch {
                lines: std::mem::replace(&mut lines, Vec::with_capacity(batch_size)),
                events,
                offset,
            };
            if tx.send(Ok(batch)).is_err() {
                return;
            }
        }
        if n == 0 {
            return;
        }
    }
}
