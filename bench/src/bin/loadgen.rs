//! `loadgen`: writes a realistic CRM event stream as NDJSON.
//!
//! ```sh
//! cargo run --release -p bench --bin loadgen -- --customers 1000000 --events 10000000 --out events.ndjson
//! ```

use std::io::{BufWriter, Write};

use bench::loadgen::{generate, StreamSpec};

fn main() {
    let mut spec = StreamSpec::default();
    let mut out_path = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        let number = |v: String| {
            v.parse::<f64>()
                .unwrap_or_else(|_| usage(&format!("{flag}: not a number: {v}")))
        };
        match flag.as_str() {
            "--customers" => spec.customers = number(value()) as u64,
            "--events" => spec.events = number(value()) as u64,
            "--seed" => spec.seed = number(value()) as u64,
            "--zipf" => spec.zipf_s = number(value()),
            "--late" => spec.late = number(value()),
            "--duplicate" => spec.duplicate = number(value()),
            "--malformed" => spec.malformed = number(value()),
            "--start-ms" => spec.start_ms = number(value()) as i64,
            "--span-days" => spec.span_ms = (number(value()) * 86_400_000.0) as i64,
            "--out" => out_path = Some(value()),
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown flag {other}")),
        }
    }
    let started = std::time::Instant::now();
    let lines = match &out_path {
        Some(path) => {
            let file = std::fs::File::create(path).unwrap_or_else(|e| usage(&format!("{path}: {e}")));
            let mut w = BufWriter::with_capacity(1 << 20, file);
            let n = generate(&spec, &mut w).expect("write stream");
            w.flush().expect("flush");
            n
        }
        None => {
            let stdout = std::io::stdout();
            let mut w = BufWriter::new(stdout.lock());
            let n = generate(&spec, &mut w).expect("write stream");
            w.flush().expect("flush");
            n
        }
    };
    eprintln!("wrote {lines} lines in {:.1} s", started.elapsed().as_secs_f64());
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("loadgen: {problem}");
    }
    eprintln!(
        "usage: loadgen [--customers N] [--events N] [--seed N] [--zipf S] [--late F] [--duplicate F] \
         [--malformed F] [--start-ms MS] [--span-days D] [--out FILE]"
    );
    std::process::exit(if problem.is_empty() { 0 } else { 2 })
}
