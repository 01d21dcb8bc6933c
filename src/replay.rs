//! `tagstream replay FILE`: ingest an NDJSON file at full speed, resumably.
//!
//! The file's byte offset is committed with every batch, so a replay killed at any moment
//! and started again continues exactly after the last committed batch.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use anyhow::Context;

use processor::{Engine, IngestRequest, Intake, Rejection, ValidEvent};

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
    let intake = engine.intake();
    // Reading and parsing run on their own thread, one batch ahead of the engine.
    let (tx, rx) = std::sync::mpsc::sync_channel::<anyhow::Result<ParsedBatch>>(2);
    let reader_thread = std::thread::spawn(move || read_batches(reader, offset, batch_size, intake, tx));
    let started = Instant::now();
    let mut bar = progress.then(|| ProgressBar::new(offset, total));
    let mut report = ReplayReport {
        accepted: 0,
        duplicates: 0,
        rejected: 0,
        elapsed: Duration::ZERO,
    };
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    // Pipelined: each batch is evaluated while the one before it is written.
    let count = |finished: Vec<processor::Finished>,
                 report: &mut ReplayReport,
                 reasons: &mut BTreeMap<String, usize>|
     -> anyhow::Result<()> {
        for f in finished {
            for outcome in f.result? {
                report.accepted += outcome.accepted;
                report.duplicates += outcome.duplicates;
                report.rejected += outcome.rejected;
                for e in outcome.errors {
                    *reasons.entry(e.reason).or_default() += 1;
                }
            }
        }
        Ok(())
    };
    for parsed in rx {
        let ParsedBatch {
            lines,
            events,
            offset,
        } = parsed?;
        let request = IngestRequest {
            raw: lines,
            parsed: events,
            positions: vec![(source.clone(), offset)],
            source: "replay",
            owned_only: false,
        };
        engine.submit_group(vec![request]);
        count(engine.take_finished(), &mut report, &mut reasons)?;
        if let Some(bar) = &mut bar {
            bar.update(offset, report.accepted + report.duplicates + report.rejected);
        }
    }
    engine.settle();
    count(engine.take_finished(), &mut report, &mut reasons)?;
    reader_thread.join().expect("the reader thread does not panic");
    report.elapsed = started.elapsed();
    if let Some(bar) = bar {
        bar.finish();
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
    intake: Intake,
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
            let events = intake.parse_batch(&lines, "replay");
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

/// Replay progress on stderr: on a terminal a bar redrawn in place a few times a second,
/// `[#########>          ]  45.2%  1234567 events  45210 events/s  ETA 0:27`; otherwise
/// (a log file, CI) the same figures as a plain line every ten seconds.
struct ProgressBar {
    started: Instant,
    last_drawn: Instant,
    start_offset: u64,
    total: u64,
    terminal: bool,
    drawn: bool,
}

impl ProgressBar {
    const WIDTH: usize = 30;

    fn new(start_offset: u64, total: u64) -> ProgressBar {
        let now = Instant::now();
        ProgressBar {
            started: now,
            last_drawn: now,
            start_offset,
            total,
            terminal: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    fn update(&mut self, offset: u64, events: usize) {
        let every = if self.terminal {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(10)
        };
        if self.last_drawn.elapsed() < every {
            return;
        }
        self.last_drawn = Instant::now();
        let line = self.render(offset, events, self.started.elapsed());
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(err, "\r{line}");
            self.drawn = true;
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    fn render(&self, offset: u64, events: usize, elapsed: Duration) -> String {
        let fraction = if self.total == 0 {
            1.0
        } else {
            (offset as f64 / self.total as f64).clamp(0.0, 1.0)
        };
        let filled = (fraction * Self::WIDTH as f64) as usize;
        let mut bar = "#".repeat(filled);
        if filled < Self::WIDTH {
            bar.push('>');
            bar.push_str(&" ".repeat(Self::WIDTH - filled - 1));
        }
        let secs = elapsed.as_secs_f64().max(1e-9);
        let rate = events as f64 / secs;
        // Remaining time from the byte rate of this run (a resumed replay starts mid-file).
        let done_bytes = offset.saturating_sub(self.start_offset) as f64;
        let eta = (done_bytes > 0.0).then(|| {
            let left = self.total.saturating_sub(offset) as f64 * secs / done_bytes;
            let left = left as u64;
            format!("  ETA {}:{:02}", left / 60, left % 60)
        });
        format!(
            "[{bar}] {:5.1}%  {events} events  {rate:.0} events/s{}",
            fraction * 100.0,
            eta.unwrap_or_default()
        )
    }

    fn finish(self) {
        if self.drawn {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_the_file_and_estimates_what_is_left() {
        let bar = ProgressBar::new(0, 1000);
        let half = bar.render(500, 20_000, Duration::from_secs(2));
        assert_eq!(
            half,
            format!(
                "[{}>{}]  50.0%  20000 events  10000 events/s  ETA 0:02",
                "#".repeat(15),
                " ".repeat(14)
            )
        );
        let done = bar.render(1000, 40_000, Duration::from_secs(4));
        assert!(
            done.starts_with(&format!("[{}] 100.0%", "#".repeat(30))),
            "{done}"
        );
        assert!(done.ends_with("ETA 0:00"), "{done}");
        // Resumed at byte 600: the estimate uses this run's rate, not the whole file's.
        let resumed = ProgressBar::new(600, 1000);
        assert!(resumed
            .render(700, 1, Duration::from_secs(60))
            .ends_with("ETA 3:00"));
        assert!(!resumed.render(600, 0, Duration::from_secs(1)).contains("ETA"));
    }
}
