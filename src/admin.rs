//! Administration commands that talk to a running server or work on a stopped store:
//! `healthcheck`, `backup`, `restore`, `partitions`.

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use processor::{BackupManifest, ClockMode, Engine, EngineConfig, BACKUP_MANIFEST};

/// How `https://` URLs are verified: against the roots built in plus `ca_file`, with the
/// certificate checked for `server_name` (default: the URL's host).
#[derive(Debug, Default, Clone)]
pub struct HttpsOptions {
    pub ca_file: Option<std::path::PathBuf>,
    pub server_name: Option<String>,
}

/// One HTTP/1.1 request without a client library: the status and the body (bodies are
/// small JSON here; the server closes the connection after answering).
fn http(method: &str, url: &str, body: &[u8], timeout: Duration) -> anyhow::Result<(u16, Vec<u8>)> {
    http_with(method, url, body, timeout, &HttpsOptions::default())
}

fn http_with(
    method: &str,
    url: &str,
    body: &[u8],
    timeout: Duration,
    https: &HttpsOptions,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let (secure, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => bail!("{url}: only http:// and https:// URLs are supported"),
    };
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to no address"))?;
    let tcp = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {host}"))?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    let mut stream: Box<dyn ReadWrite> = if secure {
        let extra = match &https.ca_file {
            Some(path) => crate::tls::read_certificates(path)?,
            None => Vec::new(),
        };
        let config = query_api::webhooks::tls_client(&extra).map_err(anyhow::Error::msg)?;
        let name = match &https.server_name {
            Some(name) => name.clone(),
            // The host without its port; an IPv6 literal without its brackets.
            None => match host.strip_prefix('[') {
                Some(v6) => v6.split_once(']').map_or(v6, |(address, _)| address).to_owned(),
                None => host.rsplit_once(':').map_or(host, |(h, _)| h).to_owned(),
            },
        };
        let name = rustls::pki_types::ServerName::try_from(name.clone())
            .with_context(|| format!("`{name}` is not a server name"))?;
        let connection = rustls::ClientConnection::new(config, name)?;
        Box::new(rustls::StreamOwned::new(connection, tcp))
    } else {
        Box::new(tcp)
    };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .with_context(|| format!("{url}: sending the request"))?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // A TLS server that closes without close_notify after a whole answer.
        Err(e) if secure && e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e).with_context(|| format!("{url}: reading the answer")),
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("{url}: not an HTTP answer"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("{url}: not an HTTP answer"))?;
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        bail!("{url}: chunked answers are not expected here");
    }
    Ok((status, raw[split + 4..].to_vec()))
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// `tagstream healthcheck`: exits 0 on a 2xx answer, 1 otherwise (container health checks).
/// An `https://` URL is verified as [`HttpsOptions`] says.
pub fn healthcheck(url: &str, https: &HttpsOptions) -> anyhow::Result<ExitCode> {
    let (status, _) = http_with("GET", url, b"", Duration::from_secs(3), https)?;
    if (200..300).contains(&status) {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{url}: {status}");
        Ok(ExitCode::from(1))
    }
}

/// `tagstream backup`: asks the server (or opens a stopped store) and prints the manifest.
pub fn backup(to: &Path, server: &str, data_dir: Option<&Path>) -> anyhow::Result<ExitCode> {
    let manifest = match data_dir {
        Some(data) => {
            let config = EngineConfig {
                clock: ClockMode::Event,
                ..EngineConfig::default()
            };
            let engine = Engine::open(data, None, config).with_context(|| {
                format!(
                    "opening the store at {} (is a server running on it?)",
                    data.display()
                )
            })?;
            engine.backup(to)?
        }
        None => {
            let to = to.to_str().context("the backup path is not UTF-8")?;
            let body = serde_json::json!({ "to": to }).to_string();
            let url = format!("{}/v1/admin/backup", server.trim_end_matches('/'));
            let (status, answer) = http("POST", &url, body.as_bytes(), Duration::from_secs(600))?;
            if status != 200 {
                bail!("{url} answered {status}: {}", String::from_utf8_lossy(&answer));
            }
            serde_json::from_slice::<BackupManifest>(&answer).context("reading the server's manifest")?
        }
    };
    println!("{}", serde_json::to_string_pretty(&manifest)?);
    Ok(ExitCode::SUCCESS)
}

/// `tagstream restore`: copies a backup into a new data directory, then opens it once to
/// check it (and prints what it holds).
pub fn restore(from: &Path, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let manifest_path = from.join(BACKUP_MANIFEST);
    let manifest: BackupManifest = serde_json::from_slice(
        &std::fs::read(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?,
    )
    .with_context(|| format!("{} is not a backup manifest", manifest_path.display()))?;
    if data_dir.exists()
        && std::fs::read_dir(data_dir)
            .with_context(|| format!("reading {}", data_dir.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} is not empty: restore into a new directory",
            data_dir.display()
        );
    }
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        if entry.file_name() == BACKUP_MANIFEST || !entry.file_type()?.is_file() {
            continue;
        }
        std::fs::copy(entry.path(), data_dir.join(entry.file_name()))
            .with_context(|| format!("copying {}", entry.path().display()))?;
    }
    let config = EngineConfig {
        clock: ClockMode::Event,
        ..EngineConfig::default()
    };
    let engine = Engine::open(data_dir, None, config).context("opening the restored store")?;
    if engine.next_seq() - 1 != manifest.last_seq {
        bail!(
            "the restored store holds changes up to seq {}, its manifest says {}",
            engine.next_seq() - 1,
            manifest.last_seq
        );
    }
    // The store the backup was taken of may have written to the state topic after it:
    // under the same writer id, a node on this store would take those records for its own
    // and resume partitions it lacks the state of (`docs/cluster.md`, "A node comes back").
    processor::kafka::renew_state_writer(&engine.reader())
        .context("giving the restored store a new writer id")?;
    println!(
        "restored {} into {}: {} customers, changes up to seq {}, sources {:?}",
        from.display(),
        data_dir.display(),
        manifest.customers,
        manifest.last_seq,
        manifest.source_offsets
    );
    Ok(ExitCode::SUCCESS)
}

/// What `tagstream partitions` does.
#[derive(clap::Subcommand)]
pub enum PartitionAction {
    /// Customers per partition.
    List,
    /// Write one partition's customers (records, retained events, dedup entries, identity
    /// entries; partition 0 of a group also its identity graph) to a file.
    Export {
        #[arg(long)]
        partition: u32,
        /// The file to write; must not exist yet.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Import a partition exported from a store with the same partition count; refused
    /// whole if any of its customers is already here.
    Import {
        /// The export file.
        file: std::path::PathBuf,
    },
    /// Delete every customer of a partition from this store (after it moved elsewhere).
    /// With `state_topic` set, also its changelog position and Kafka offsets, and only once
    /// the broker confirmed every delta of it.
    Drop {
        #[arg(long)]
        partition: u32,
    },
    /// Restore a partition from the state changelog (`[kafka] state_topic`), read from its
    /// start to its end: the partition as the last store that kept it committed it, with
    /// the Kafka offsets to resume from. Refused whole if any of its customers is here.
    /// This store then owns the partition's changelog: serve it with `state_topic` only
    /// once the store that wrote the topic is gone for good.
    Restore {
        #[arg(long)]
        partition: u32,
        /// Give up when the broker sends nothing for this many seconds before the end.
        #[arg(long, default_value_t = 30)]
        stall_secs: u64,
    },
}

/// `tagstream partitions ...` on a stopped store; `kafka` is the configured Kafka side.
pub fn partitions(
    action: PartitionAction,
    mut engine: Engine,
    kafka: Option<processor::kafka::KafkaSettings>,
) -> anyhow::Result<ExitCode> {
    let partitions = engine.config().partitions;
    match action {
        PartitionAction::List => {
            let counts = engine.reader().partition_counts(partitions)?;
            println!("partition\tcustomers");
            for (p, n) in counts.iter().enumerate() {
                println!("{p}\t{n}");
            }
        }
        PartitionAction::Export { partition, out } => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            let mut writer = std::io::BufWriter::new(file);
            let summary = engine
                .reader()
                .export_partition(partition, partitions, &mut writer)?;
            writer
                .into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_all())
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "exported partition {partition} of {partitions} to {}: {} customers, {} events, {} dedup entries, {} identity entries",
                out.display(),
                summary.customers,
                summary.events,
                summary.dedup_entries,
                summary.identity_entries
            );
        }
        PartitionAction::Import { file } => {
            let f = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
            let summary = engine.import_partition(&mut std::io::BufReader::new(f))?;
            println!(
                "imported partition {} of {} from {}: {} customers, {} events, {} dedup entries, {} identity entries",
                summary.partition,
                summary.partitions,
                file.display(),
                summary.customers,
                summary.events,
                summary.dedup_entries,
                summary.identity_entries
            );
        }
        PartitionAction::Drop { partition } => {
            if engine.config().changelog {
                // Its new owner restores it from the state topic: its deltas must all be
                // there, and its changelog position and offsets go with it.
                let summary = engine.release_partition(partition)?;
                println!(
                    "released partition {partition}: {} customers, its state changelog position and Kafka offsets",
                    summary.customers
                );
            } else {
                let summary = engine.drop_partition(partition)?;
                println!("dropped partition {partition}: {} customers", summary.customers);
            }
        }
        PartitionAction::Restore {
            partition,
            stall_secs,
        } => {
            let Some((kafka, topic)) = kafka.and_then(|k| k.state_topic.clone().map(|t| (k, t))) else {
                anyhow::bail!(
                    "restoring needs `[kafka] brokers` and `[kafka] state_topic` in the configuration"
                );
            };
            if partition >= partitions {
                anyhow::bail!(
                    "partition {partition} does not exist: there are {partitions} (0 to {})",
                    partitions - 1
                );
            }
            let stall = std::time::Duration::from_secs(stall_secs.max(1));
            let processor::kafka::StateRead {
                restore,
                incomplete,
                next_offset,
            } = processor::kafka::read_state_partition(
                &kafka,
                &topic,
                partition,
                partitions,
                None,
                stall,
                &|_| {},
            )
            .map_err(anyhow::Error::msg)?;
            let summary = engine.restore_partition(&restore)?;
            // A member serving this store checks the topic from here before it resumes the
            // partition (`docs/cluster.md`, "A node comes back").
            processor::kafka::set_state_position(&engine.reader(), &topic, partition, next_offset)?;
            println!(
                "restored partition {partition} of {partitions} from `{topic}` ({} records: {} deltas, {} keyed, {} checkpoints; to commit {}{}): {} customers, {} events, {} dedup entries",
                restore.records,
                restore.deltas,
                restore.keyed,
                restore.checkpoints,
                restore.commit,
                if incomplete > 0 { format!(", {incomplete} incomplete left out") } else { String::new() },
                summary.customers,
                summary.events,
                summary.dedup_entries
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Subcommand)]
pub enum KeyAction {
    /// Create a key for a role; the key is printed once and never stored.
    Create {
        #[arg(long)]
        role: String,
        #[arg(long)]
        name: String,
    },
    /// Every key (revoked ones too), without the keys themselves.
    List,
    /// Print a fresh key without storing it, for `[access] bootstrap_key_file` (a secret
    /// mounted into a container); it becomes an admin key when the node starts.
    Generate,
    /// Revoke a key by its id or name; requests with it are refused at once.
    Revoke {
        /// The key's id (`tsk_<id>_...`) or name.
        key: String,
    },
}

/// `tagstream keys`: on the store directly (the node must be stopped: RocksDB allows one
/// process), audited as `cli`.
pub fn keys(action: KeyAction, settings: &crate::config::Settings) -> anyhow::Result<ExitCode> {
    use query_api::access::{AccessConfig, AuditRecord, KeyStore};
    let action = match action {
        // Needs no store: the key is stored by the node that imports it.
        KeyAction::Generate => {
            println!("{}", KeyStore::generate().expose());
            return Ok(ExitCode::SUCCESS);
        }
        stored => stored,
    };
    let retention = processor::store::Retention {
        dedup_horizon_ms: settings.retention.dedup_horizon.0,
        history_ms: settings.retention.history.0,
        block_cache_bytes: 8 << 20,
        memtable_bytes: 8 << 20,
    };
    let dir = &settings.data_dir;
    let store = processor::store::Store::open(dir, true, retention).map_err(|e| {
        if e.to_string().contains("lock") {
            anyhow::anyhow!(
                "the store at {} is in use by a running node: stop it, or manage keys with POST/GET/DELETE /v1/admin/keys and an admin key",
                dir.display()
            )
        } else {
            anyhow::anyhow!("opening the store at {}: {e}", dir.display())
        }
    })?;
    let store = Arc::new(store);
    let keys = KeyStore::open(store.clone())?;
    let audit = query_api::access::AuditLog::open(store)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    match action {
        KeyAction::Create { role, name } => {
            let roles = AccessConfig {
                roles: settings.access.roles.clone(),
                ..AccessConfig::default()
            }
            .resolve_roles()
            .map_err(anyhow::Error::msg)?;
            if !roles.contains_key(&role) {
                let known: Vec<&str> = roles.keys().map(String::as_str).collect();
                anyhow::bail!("no role `{role}`; roles: {}", known.join(", "));
            }
            let new = keys.create(&name, &role, "cli", now)?;
            let detail = serde_json::json!({"key_id": new.info.id, "name": name, "role": role});
            audit.append(AuditRecord::command(
                "keys create",
                detail.as_object().cloned().unwrap_or_default(),
            ))?;
            eprintln!(
                "created key `{name}` (id {}, role {role}); it is shown once, store it now:",
                new.info.id
            );
            println!("{}", new.key.expose());
        }
        KeyAction::List => {
            for k in keys.list() {
                let state = k
                    .revoked_at
                    .map_or("active".to_owned(), |t| format!("revoked at {t}"));
                println!("{}\t{}\t{}\t{state}", k.id, k.name, k.role);
            }
        }
        KeyAction::Generate => {}
        KeyAction::Revoke { key } => {
            let id = key
                .strip_prefix("tsk_")
                .and_then(|rest| rest.split('_').next())
                .unwrap_or(&key)
                .to_owned();
            let info = keys.revoke(&id, now)?;
            let detail = serde_json::json!({"key_id": info.id, "name": info.name, "role": info.role});
            audit.append(AuditRecord::command(
                "keys revoke",
                detail.as_object().cloned().unwrap_or_default(),
            ))?;
            eprintln!("revoked key `{}` (id {})", info.name, info.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}
