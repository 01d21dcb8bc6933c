//! HTTP load for the lookup benchmark (issue #4): `C` keep-alive connections each sending
//! `GET /v1/customers/{id}` back to back (closed loop) for `D` seconds, while one more
//! connection posts events at a fixed rate, as a live deployment would. Prints requests/s
//! and latency percentiles of the lookups, and what the ingest achieved.
//!
//! ```text
//! httpload --addr 127.0.0.1:8080 --customers 100000 --connections 8 --seconds 20 \
//!          --ingest-rate 10000 [--path-prefix /v1/customers/] [--zipf | --top N]
//!          [--key LOOKUP_KEY] [--ingest-key INGEST_KEY] [--ids FILE]
//! ```
//!
//! `--zipf` draws the ids from the activity's own Zipf law; `--top N` uniformly from the N
//! busiest customers (the head, whose windows hold the most events); `--ids FILE`
//! uniformly from the ids in FILE, one per line (customers known to exist: a uniform draw
//! of loadgen ids also asks for customers the stream never had).
//!
//! A tool of our own rather than wrk (not installed here): plain HTTP/1.1 over blocking
//! sockets, one thread per connection, no allocation per request beyond the response body.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bench::loadgen::{event_line, Rng, Zipf};

struct Args {
    addr: String,
    /// `Authorization: Bearer` for the lookups and for the ingest, when set.
    key: Option<String>,
    ingest_key: Option<String>,
    customers: u64,
    connections: usize,
    seconds: u64,
    ingest_rate: u64,
    ingest_batch: u64,
    zipf: bool,
    /// Look up only the `top` busiest customers (Zipf ranks 0..top).
    top: Option<u64>,
    /// Look up only these ids (URL-safe as they are).
    ids: Vec<String>,
}

/// The `Authorization` header line for `key`, or nothing.
fn auth_header(key: Option<&str>) -> String {
    key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: "127.0.0.1:8080".into(),
        key: None,
        ingest_key: None,
        customers: 100_000,
        connections: 8,
        seconds: 20,
        ingest_rate: 10_000,
        ingest_batch: 500,
        zipf: false,
        top: None,
        ids: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--zipf" {
            args.zipf = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {value}"))
        };
        match flag.as_str() {
            "--addr" => args.addr = value.clone(),
            "--key" => args.key = Some(value.clone()),
            "--ingest-key" => args.ingest_key = Some(value.clone()),
            "--customers" => args.customers = number()?.max(1),
            "--connections" => args.connections = number()?.max(1) as usize,
            "--seconds" => args.seconds = number()?.max(1),
            "--ingest-rate" => args.ingest_rate = number()?,
            "--ingest-batch" => args.ingest_batch = number()?.max(1),
            "--top" => args.top = Some(number()?.max(1)),
            "--ids" => {
                let text = std::fs::read_to_string(&value).map_err(|e| format!("--ids {value}: {e}"))?;
                args.ids = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect();
                if let Some(bad) = args.ids.iter().find(|id| {
                    !id.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                }) {
                    return Err(format!("--ids {value}: `{bad}` would need escaping in a path"));
                }
                if args.ids.is_empty() {
                    return Err(format!("--ids {value}: no ids"));
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// One keep-alive HTTP/1.1 connection.
struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    body: Vec<u8>,
}

impl Connection {
    fn open(addr: &str) -> std::io::Result<Connection> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            writer: stream.try_clone()?,
            reader: BufReader::with_capacity(64 * 1024, stream),
            body: Vec::with_capacity(4096),
        })
    }

    /// Sends a request and reads the whole response; returns the status.
    fn request(&mut self, head: &[u8], body: &[u8]) -> std::io::Result<u16> {
        self.writer.write_all(head)?;
        self.writer.write_all(body)?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut length = 0usize;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        self.body.resize(length, 0);
        self.reader.read_exact(&mut self.body)?;
        Ok(status)
    }
}

fn lookups(args: &Args, worker: usize, stop: &AtomicBool) -> (Vec<u32>, u64) {
    let mut conn = Connection::open(&args.addr).expect("connect");
    let mut rng = Rng::new(1000 + worker as u64);
    let zipf = Zipf::new(args.customers, 1.05);
    let mut latencies_us = Vec::with_capacity(1 << 20);
    let mut errors = 0;
    let mut head = Vec::with_capacity(128);
    while !stop.load(Ordering::Relaxed) {
        let rank = if let Some(top) = args.top {
            rng.below(top)
        } else if args.zipf {
            zipf.sample(&mut rng)
        } else {
            rng.below(args.customers)
        };
        head.clear();
        if args.ids.is_empty() {
            // The loadgen's phone-number ids (company-name ids are skipped: they need escaping).
            let rank = if rank.is_multiple_of(5) { rank + 1 } else { rank };
            write!(head, "GET /v1/customers/1{:010}", 3_000_000_000 + rank)
        } else {
            let id = &args.ids[rng.below(args.ids.len() as u64) as usize];
            write!(head, "GET /v1/customers/{id}")
        }
        .expect("write to a Vec");
        write!(
            head,
            " HTTP/1.1\r\nHost: {}\r\n{}\r\n",
            args.addr,
            auth_header(args.key.as_deref())
        )
        .expect("write to a Vec");
        let started = Instant::now();
        match conn.request(&head, b"") {
            Ok(200 | 404) => latencies_us.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32),
            Ok(_) => errors += 1,
            Err(e) => panic!("lookup connection failed: {e}"),
        }
    }
    (latencies_us, errors)
}

fn ingest(args: &Args, stop: &AtomicBool) -> (u64, u64) {
    if args.ingest_rate == 0 {
        return (0, 0);
    }
    let mut conn = Connection::open(&args.addr).expect("connect");
    let mut rng = Rng::new(99);
    let zipf = Zipf::new(args.customers, 1.05);
    let batches_per_sec = (args.ingest_rate as f64 / args.ingest_batch as f64).max(0.001);
    let interval = Duration::from_secs_f64(1.0 / batches_per_sec);
    let (mut sent, mut busy) = (0u64, 0u64);
    let mut i = 0u64;
    let started = Instant::now();
    let mut body = Vec::new();
    let mut batch_no = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        body.clear();
        for _ in 0..args.ingest_batch {
            i += 1;
            let customer = bench::loadgen::customer_id(zipf.sample(&mut rng), &mut rng);
            // Ids unique to this run, so re-runs are not duplicates.
            let line =
                event_line(i, &customer, now_ms, &mut rng).replacen("\"ev-", &format!("\"live-{now_ms}-"), 1);
            body.extend_from_slice(line.as_bytes());
            body.push(b'\n');
        }
        let head = format!(
            "POST /v1/events HTTP/1.1\r\nHost: {}\r\n{}Content-Type: application/x-ndjson\r\nContent-Length: {}\r\n\r\n",
            args.addr,
            auth_header(args.ingest_key.as_deref()),
            body.len()
        );
        match conn.request(head.as_bytes(), &body) {
            Ok(200) => sent += args.ingest_batch,
            Ok(_) => busy += 1,
            Err(e) => panic!("ingest connection failed: {e}"),
        }
        batch_no += 1;
        let due = started + interval * batch_no;
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    (sent, busy)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let args = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("httpload: {e}");
            std::process::exit(2);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..args.connections)
        .map(|w| {
            let (args, stop) = (args.clone(), stop.clone());
            std::thread::spawn(move || lookups(&args, w, &stop))
        })
        .collect();
    let ingester = {
        let (args, stop) = (args.clone(), stop.clone());
        std::thread::spawn(move || ingest(&args, &stop))
    };
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(args.seconds));
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.join().expect("lookup worker");
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (ingested, ingest_refused) = ingester.join().expect("ingest worker");
    latencies.sort_unstable();
    println!(
        "lookups: {:.0} req/s over {elapsed:.1} s, {} requests, {} connections, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms, {errors} errors",
        latencies.len() as f64 / elapsed,
        latencies.len(),
        args.connections,
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        percentile(&latencies, 1.0),
    );
    println!(
        "ingest meanwhile: {:.0} events/s (target {}), {ingest_refused} batches refused",
        ingested as f64 / elapsed,
        args.ingest_rate
    );
}
