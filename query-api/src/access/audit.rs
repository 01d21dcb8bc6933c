//! The audit trail: who did what, when, and how it ended — one record per audited request
//! (every mutating request but event ingest, every export, SQL statement and query, every
//! refused authentication), per key created or revoked with the binary, durable (fsynced)
//! before the answer leaves, append-only (there is no call that changes or deletes a record),
//! readable by `admin` (`GET /v1/audit?after=`), and emitted as a structured log line
//! (`target: tagstream::audit`, without the path, which may carry customer ids).

use std::sync::{Arc, Mutex};

use processor::store::{Store, CF_AUDIT};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    /// Wall-clock ms.
    pub at: i64,
    /// The key's name, `anonymous` on an open node, `cli` for the binary's own commands.
    pub actor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// `METHOD /route/{template}`, or the command (`keys create`).
    pub action: String,
    /// The request's path (it names the segment, customer or key acted on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The HTTP status answered (0 for commands of the binary).
    pub status: u16,
    /// `ok`, `denied` (401, 403, 429) or `failed` (any other error).
    pub outcome: String,
    /// What the handler added: the diff and version of a rule change, the rows and format of
    /// an export, the SQL statement, the key's name and role, why authentication failed.
    #[serde(skip_serializing_if = "Map::is_empty", default)]
    pub detail: Map<String, Value>,
}

/// What a handler adds to its request's audit record.
#[derive(Clone, Default)]
pub struct AuditNote(Arc<Mutex<Map<String, Value>>>);

impl AuditNote {
    pub fn set(&self, key: &str, value: impl Serialize) {
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_owned(), value);
    }

    pub fn take(&self) -> Map<String, Value> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

pub struct AuditLog {
    store: Arc<Store>,
    /// The next record's `seq`; held while a record is written, so records land in order.
    next: Mutex<u64>,
}

fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

impl AuditLog {
    pub fn open(store: Arc<Store>) -> Result<AuditLog, processor::store::StoreError> {
        let last = match store.scan_reverse(CF_AUDIT).next() {
            Some(item) => {
                let (k, _) = item?;
                u64::from_be_bytes(k[..8].try_into().unwrap_or([0; 8]))
            }
            None => 0,
        };
        Ok(AuditLog {
            store,
            next: Mutex::new(last + 1),
        })
    }

    /// Appends `record` (its `seq` and `at` are set here), fsynced, and logs it. Returns the
    /// `seq`.
    pub fn append(&self, mut record: AuditRecord) -> Result<u64, processor::store::StoreError> {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        record.seq = *next;
        record.at = wall_ms();
        let value = serde_json::to_vec(&record).expect("an audit record serialises");
        self.store.put_durable(CF_AUDIT, &[(&key(record.seq), &value)])?;
        *next += 1;
        drop(next);
        let detail = Value::Object(summary(&record.detail));
        tracing::info!(
            target: "tagstream::audit",
            seq = record.seq,
            actor = %record.actor,
            role = record.role.as_deref().unwrap_or(""),
            action = %record.action,
            status = record.status,
            outcome = %record.outcome,
            detail = %detail,
            "audit"
        );
        Ok(record.seq)
    }

    /// Records after `after`, oldest first, at most `limit`.
    pub fn read(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, processor::store::StoreError> {
        let mut out = Vec::new();
        for item in self.store.scan_from(CF_AUDIT, &key(after + 1)) {
            if out.len() == limit {
                break;
            }
            let (_, v) = item?;
            match serde_json::from_slice(&v) {
                Ok(record) => out.push(record),
                Err(e) => {
                    return Err(processor::store::StoreError::Corrupt(format!(
                        "an audit record does not parse: {e}"
                    )))
                }
            }
        }
        Ok(out)
    }
}

/// The detail for the log line: long values (a rule diff, a statement) cut to 200 characters.
fn summary(detail: &Map<String, Value>) -> Map<String, Value> {
    detail
        .iter()
        .map(|(k, v)| {
            let text = v.to_string();
            let short = if text.chars().count() > 200 {
                Value::String(format!("{}…", text.chars().take(200).collect::<String>()))
            } else {
                v.clone()
            };
            (k.clone(), short)
        })
        .collect()
}

pub(crate) fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl AuditRecord {
    /// A record for a command of the binary (no HTTP status).
    pub fn command(action: &str, detail: Map<String, Value>) -> AuditRecord {
        AuditRecord {
            seq: 0,
            at: 0,
            actor: "cli".to_owned(),
            key_id: None,
            role: None,
            action: action.to_owned(),
            target: None,
            status: 0,
            outcome: "ok".to_owned(),
            detail,
        }
    }
}
