//! Helpers for tagstream's end-to-end tests: the tests themselves (`tests/e2e/*.rs`) start
//! the real `tagstream` binary.

use std::path::{Path, PathBuf};

/// The repository root, found at run time from the package under test (cargo and nextest
/// set `CARGO_MANIFEST_DIR` when they run a test). Not the path this crate was compiled at:
/// a shared target dir can hold a build made from another clone of the repository.
pub fn repo_root() -> PathBuf {
    let start = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    start
        .ancestors()
        .find(|dir| dir.join("scripts/test-all.sh").is_file())
        .unwrap_or_else(|| panic!("no repository root above {}", start.display()))
        .to_path_buf()
}

/// The conformance sample kept in the repository (`tests/conformance/`, see its README):
/// a generated stream and the exact outputs the contract requires for two rule sets.
pub fn conformance_dir() -> PathBuf {
    let dir = repo_root().join("tests/conformance");
    assert!(
        dir.join("events.ndjson").is_file(),
        "the conformance sample is missing at {}",
        dir.display()
    );
    dir
}

/// A fresh temporary directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("tagstream-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    /// Removes the directory; kept when a test fails with `TAGSTREAM_KEEP_FAILED` set, to
    /// look at a failed run's stores.
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("TAGSTREAM_KEEP_FAILED").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Kafka topic partition's records in offset order: key, value (`None`: a tombstone), and
/// the state changelog's commit header when there is one.
pub type LogRecord = (Vec<u8>, Option<Vec<u8>>, Option<u64>);

/// What a compacting broker keeps of `records` (`cleanup.policy = compact`): the latest
/// record of each key, in offset order; tombstones too, unless they have outlived
/// `delete.retention.ms` (`keep_tombstones` false, the most a broker can take away).
pub fn compacted(records: &[LogRecord], keep_tombstones: bool) -> Vec<LogRecord> {
    let mut latest: std::collections::BTreeMap<&[u8], usize> = std::collections::BTreeMap::new();
    for (i, (key, _, _)) in records.iter().enumerate() {
        latest.insert(key, i);
    }
    let mut kept: Vec<usize> = latest.into_values().collect();
    kept.sort_unstable();
    kept.into_iter()
        .map(|i| records[i].clone())
        .filter(|(_, value, _)| keep_tombstones || value.is_some())
        .collect()
}

/// A minimal HTTP/1.1 client for tests (one request per connection).
pub mod http {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    pub struct Response {
        pub status: u16,
        pub headers: String,
        pub body: Vec<u8>,
    }

    impl Response {
        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }

        /// A response header's value (names compare case-insensitively).
        pub fn header(&self, name: &str) -> Option<String> {
            self.headers.lines().find_map(|line| {
                let (n, v) = line.split_once(':')?;
                n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
        }

        pub fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
        }
    }

    /// `text` as one segment of a URL path: every byte but the unreserved ones as `%XX`.
    pub fn encode_path(text: &str) -> String {
        text.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    pub fn request(addr: &str, method: &str, path: &str, body: &[u8]) -> Response {
        request_with(addr, method, path, &[], body)
    }

    /// [`request`] with extra headers.
    pub fn request_with(
        addr: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let extra: String = headers.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("end of headers");
        let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
        let status = headers
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        let mut body = raw[split + 4..].to_vec();
        if headers
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        Response {
            status,
            headers,
            body,
        }
    }

    fn dechunk(mut data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
            let size =
                usize::from_str_radix(std::str::from_utf8(&data[..eol]).unwrap().trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
            data = &data[eol + 2 + size + 2..];
        }
        out
    }
}

/// Reading the members exports the API streams.
/// A Server-Sent Events reader over a raw socket (chunked transfer encoding).
pub mod sse {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use serde_json::Value;

    pub struct Sse {
        stream: TcpStream,
        raw: Vec<u8>,
        text: String,
    }

    impl Sse {
        /// `GET path` on the server at `addr`, resuming after `last_event_id` when given.
        pub fn connect(addr: &str, path: &str, last_event_id: Option<&str>) -> Sse {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let resume = last_event_id.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
            let head =
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{resume}\r\n");
            stream.write_all(head.as_bytes()).unwrap();
            let mut sse = Sse {
                stream,
                raw: Vec::new(),
                text: String::new(),
            };
            while !sse.raw.windows(4).any(|w| w == b"\r\n\r\n") {
                sse.fill();
            }
            let end = sse.raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            let headers = String::from_utf8_lossy(&sse.raw[..end]).to_ascii_lowercase();
            assert!(headers.starts_with("http/1.1 200"), "{headers}");
            assert!(headers.contains("content-type: text/event-stream"), "{headers}");
            sse.raw.drain(..end + 4);
            sse
        }

        fn fill(&mut self) {
            let mut buf = [0u8; 8192];
            let n = self.stream.read(&mut buf).expect("the stream stays open");
            assert!(n > 0, "the server closed the stream");
            self.raw.extend_from_slice(&buf[..n]);
        }

        /// Moves whole chunks from `raw` to `text`.
        fn dechunk(&mut self) {
            while let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") {
                let size =
                    usize::from_str_radix(std::str::from_utf8(&self.raw[..eol]).unwrap().trim(), 16).unwrap();
                if self.raw.len() < eol + 2 + size + 2 {
                    return;
                }
                self.text
                    .push_str(std::str::from_utf8(&self.raw[eol + 2..eol + 2 + size]).unwrap());
                self.raw.drain(..eol + 2 + size + 2);
            }
        }

        /// The next event: (id, event, data).
        pub fn next_event(&mut self) -> (String, String, Value) {
            loop {
                self.dechunk();
                while let Some(end) = self.text.find("\n\n") {
                    let block: String = self.text.drain(..end + 2).collect();
                    let field = |name: &str| {
                        block
                            .lines()
                            .find_map(|l| l.strip_prefix(name).map(str::to_owned))
                    };
                    if let (Some(id), Some(event), Some(data)) =
                        (field("id: "), field("event: "), field("data: "))
                    {
                        return (id, event, serde_json::from_str(&data).unwrap());
                    }
                }
                self.fill();
            }
        }
    }
}

pub mod exports {
    use arrow_array::RecordBatch;

    /// The record batches of a Parquet file.
    pub fn parquet_batches(body: &[u8]) -> Vec<RecordBatch> {
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::copy_from_slice(
            body,
        ))
        .expect("a Parquet file")
        .build()
        .expect("a Parquet reader")
        .map(|b| b.expect("a record batch"))
        .collect()
    }

    /// The record batches of an Arrow IPC stream.
    pub fn arrow_batches(body: &[u8]) -> Vec<RecordBatch> {
        arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None)
            .expect("an Arrow IPC stream")
            .map(|b| b.expect("a record batch"))
            .collect()
    }
}
