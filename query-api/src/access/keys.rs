//! API keys: created and revoked with `tagstream keys` or `/v1/admin/keys`, stored hashed.
//!
//! A key reads `tsk_<id>_<secret>`: the 10-character id is public (it names the key in lists
//! and the audit trail), the secret is 32 random bytes from the operating system. The store
//! keeps the id, the name, the role and the SHA-256 of the whole key — never the key itself,
//! which is shown once, when it is created. The secret carries 256 bits of entropy, so a fast
//! hash is enough (a password hash guards low-entropy secrets); the comparison is constant
//! time.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use processor::store::{Store, CF_ACCESS};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const KEY_PREFIX: &str = "tsk_";
const ID_LEN: usize = 10;
const RECORD_PREFIX: &[u8] = b"key:";

/// A key as stored: everything but the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub role: String,
    /// Hex SHA-256 of the whole key.
    hash: String,
    pub created_at: i64,
    pub created_by: String,
    pub revoked_at: Option<i64>,
}

impl std::fmt::Debug for KeyRecord {
    /// Without the hash: nothing derived from a secret goes to logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRecord")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("role", &self.role)
            .field("revoked_at", &self.revoked_at)
            .finish_non_exhaustive()
    }
}

/// A key as listed.
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    pub role: String,
    pub created_at: i64,
    pub created_by: String,
    pub revoked_at: Option<i64>,
}

impl From<&KeyRecord> for KeyInfo {
    fn from(r: &KeyRecord) -> Self {
        KeyInfo {
            id: r.id.clone(),
            name: r.name.clone(),
            role: r.role.clone(),
            created_at: r.created_at,
            created_by: r.created_by.clone(),
            revoked_at: r.revoked_at,
        }
    }
}

/// A key just created: the only time the key itself exists outside its holder.
pub struct NewKey {
    pub info: KeyInfo,
    pub key: Secret,
}

/// A secret that prints as `***` in `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("{0}")]
    Invalid(String),
    #[error("no key `{0}`")]
    NotFound(String),
    #[error("a key named `{0}` exists already; revoke it or choose another name")]
    NameTaken(String),
    #[error("the store: {0}")]
    Store(String),
    /// In a group of several: the group could not be told, so nothing was changed.
    #[error("{0}")]
    Unshared(String),
}

fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The id part of a presented key, if it has the shape of one.
fn key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == ID_LEN && !secret.is_empty()).then_some(id)
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the operating system's random source");
    bytes
}

/// Names: letters, digits, `-`, `_`, `.`, `@`; 1–64 characters.
pub fn check_name(name: &str) -> Result<(), KeyError> {
    let ok = !name.is_empty()
        && name.chars().count() <= 64
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::Invalid(format!(
            "`{name}` is not a key name: 1-64 letters, digits, `-`, `_`, `.` or `@`"
        )))
    }
}

impl KeyRecord {
    /// Takes in what `other` (the same key as another node has it) knows: the earliest
    /// revocation. Returns whether anything changed; `None` when `other` is another key
    /// under the same id (never the case for ids drawn at random, refused if it happens).
    pub(crate) fn join(&mut self, other: &KeyRecord) -> Option<bool> {
        if self.id != other.id || self.hash != other.hash {
            return None;
        }
        let revoked_at = match (self.revoked_at, other.revoked_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let changed = revoked_at != self.revoked_at;
        self.revoked_at = revoked_at;
        Some(changed)
    }
}

/// The keys of a store, held in memory and written through.
pub struct KeyStore {
    store: Arc<Store>,
    keys: RwLock<HashMap<String, KeyRecord>>,
    /// One change at a time (creation checks names, then publishes without holding
    /// `keys`, which every request reads).
    writing: std::sync::Mutex<()>,
}

impl KeyStore {
    pub fn open(store: Arc<Store>) -> Result<KeyStore, KeyError> {
        let mut keys = HashMap::new();
        for item in store.scan_from(CF_ACCESS, RECORD_PREFIX) {
            let (k, v) = item.map_err(|e| KeyError::Store(e.to_string()))?;
            if !k.starts_with(RECORD_PREFIX) {
                break;
            }
            let record: KeyRecord = serde_json::from_slice(&v)
                .map_err(|e| KeyError::Store(format!("a key record does not parse: {e}")))?;
            keys.insert(record.id.clone(), record);
        }
        Ok(KeyStore {
            store,
            keys: RwLock::new(keys),
            writing: std::sync::Mutex::default(),
        })
    }

    fn write(&self, record: &KeyRecord) -> Result<(), KeyError> {
        let key = [RECORD_PREFIX, record.id.as_bytes()].concat();
        let value = serde_json::to_vec(record).expect("a key record serialises");
        self.store
            .put_durable(CF_ACCESS, &[(&key, &value)])
            .map_err(|e| KeyError::Store(e.to_string()))
    }

    /// True when at least one key is not revoked.
    pub fn any_active(&self) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|k| k.revoked_at.is_none())
    }

    /// Creates a key for `role` (which the caller has checked exists).
    pub fn create(&self, name: &str, role: &str, by: &str, now: i64) -> Result<NewKey, KeyError> {
        self.create_then(name, role, by, now, |_| Ok(()))
    }

    /// [`KeyStore::create`], handing the record to `publish` (the group's other nodes)
    /// before it is stored: when `publish` fails, no key is made.
    pub fn create_then(
        &self,
        name: &str,
        role: &str,
        by: &str,
        now: i64,
        publish: impl FnOnce(&KeyRecord) -> Result<(), KeyError>,
    ) -> Result<NewKey, KeyError> {
        check_name(name)?;
        let _one_at_a_time = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let (record, key) = {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            if keys.values().any(|k| k.name == name && k.revoked_at.is_none()) {
                return Err(KeyError::NameTaken(name.to_owned()));
            }
            let id = loop {
                let id = base32(&random_bytes::<8>())[..ID_LEN].to_owned();
                if !keys.contains_key(&id) {
                    break id;
                }
            };
            let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>());
            let key = format!("{KEY_PREFIX}{id}_{secret}");
            let record = KeyRecord {
                id,
                name: name.to_owned(),
                role: role.to_owned(),
                hash: hash(&key),
                created_at: now,
                created_by: by.to_owned(),
                revoked_at: None,
            };
            (record, key)
        };
        publish(&record)?;
        self.write(&record)?;
        let info = KeyInfo::from(&record);
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(record.id.clone(), record);
        Ok(NewKey {
            info,
            key: Secret(key),
        })
    }

    /// A fresh key, not stored: for a secret store that hands it to [`KeyStore::import`]
    /// (`[access] bootstrap_key_file`).
    pub fn generate() -> Secret {
        let id = base32(&random_bytes::<8>())[..ID_LEN].to_owned();
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>());
        Secret(format!("{KEY_PREFIX}{id}_{secret}"))
    }

    /// Makes `key` (made by [`KeyStore::generate`]) a key of `role` named `name`, once: a
    /// key already present is left as it is (also when revoked: a revoked bootstrap key
    /// stays revoked). Returns whether it was added.
    pub fn import(&self, key: &str, name: &str, role: &str, now: i64) -> Result<bool, KeyError> {
        check_name(name)?;
        let id = key_id(key)
            .filter(|_| key.len() >= KEY_PREFIX.len() + ID_LEN + 1 + 40)
            .ok_or_else(|| KeyError::Invalid("not a key made by `tagstream keys generate`".into()))?;
        let _one_at_a_time = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = keys.get(id) {
            let same: bool = hash(key).as_bytes().ct_eq(existing.hash.as_bytes()).into();
            return if same {
                Ok(false)
            } else {
                Err(KeyError::Invalid(format!("another key has the id `{id}`")))
            };
        }
        if keys.values().any(|k| k.name == name && k.revoked_at.is_none()) {
            return Err(KeyError::NameTaken(name.to_owned()));
        }
        let record = KeyRecord {
            id: id.to_owned(),
            name: name.to_owned(),
            role: role.to_owned(),
            hash: hash(key),
            created_at: now,
            created_by: "bootstrap_key_file".to_owned(),
            revoked_at: None,
        };
        self.write(&record)?;
        keys.insert(id.to_owned(), record);
        Ok(true)
    }

    /// Revokes the key with this id or name; revoking a revoked key is a no-op.
    pub fn revoke(&self, id_or_name: &str, now: i64) -> Result<KeyInfo, KeyError> {
        self.revoke_then(id_or_name, now, |_| Ok(()))
    }

    /// [`KeyStore::revoke`], handing the revoked record to `publish` before it is stored:
    /// when `publish` fails, the key stays live.
    pub fn revoke_then(
        &self,
        id_or_name: &str,
        now: i64,
        publish: impl FnOnce(&KeyRecord) -> Result<(), KeyError>,
    ) -> Result<KeyInfo, KeyError> {
        let _one_at_a_time = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let record = {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            keys.values()
                .filter(|k| k.id == id_or_name || (k.name == id_or_name && k.revoked_at.is_none()))
                .min_by_key(|k| k.id != id_or_name)
                .ok_or_else(|| KeyError::NotFound(id_or_name.to_owned()))?
                .clone()
        };
        if record.revoked_at.is_some() {
            return Ok(KeyInfo::from(&record));
        }
        let mut revoked = record;
        revoked.revoked_at = Some(now);
        publish(&revoked)?;
        self.write(&revoked)?;
        let info = KeyInfo::from(&revoked);
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(revoked.id.clone(), revoked);
        Ok(info)
    }

    /// Takes in a key as another node of the group has it: added when this store lacks
    /// it, revoked when the record is (the earliest revocation kept) — a revoked key is
    /// never live again, whatever order the records come in. Returns whether this store
    /// changed.
    pub fn merge(&self, record: &KeyRecord) -> Result<bool, KeyError> {
        let _one_at_a_time = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let merged = {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            match keys.get(&record.id) {
                None => record.clone(),
                Some(existing) => {
                    let mut merged = existing.clone();
                    match merged.join(record) {
                        Some(true) => merged,
                        Some(false) => return Ok(false),
                        None => {
                            return Err(KeyError::Invalid(format!(
                                "another key has the id `{}`",
                                record.id
                            )))
                        }
                    }
                }
            }
        };
        self.write(&merged)?;
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(merged.id.clone(), merged);
        Ok(true)
    }

    /// Every key as stored (hashes included): what a node shares with its group.
    pub fn records(&self) -> Vec<KeyRecord> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<KeyRecord> = keys.values().cloned().collect();
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        out
    }

    /// Every key, revoked ones too, oldest first.
    pub fn list(&self) -> Vec<KeyInfo> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<KeyInfo> = keys.values().map(KeyInfo::from).collect();
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        out
    }

    /// The live key `presented` is, compared in constant time.
    pub fn verify(&self, presented: &str) -> Option<KeyInfo> {
        let id = key_id(presented)?;
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let record = keys.get(id)?;
        let matches: bool = hash(presented).as_bytes().ct_eq(record.hash.as_bytes()).into();
        (matches && record.revoked_at.is_none()).then(|| KeyInfo::from(record))
    }
}

/// Lower-case base32 (RFC 4648 alphabet), no padding: ids that read well and need no escaping.
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (::tests::TempDir, Arc<Store>) {
        let dir = ::tests::TempDir::new("keys");
        let retention = processor::store::Retention {
            dedup_horizon_ms: 1,
            history_ms: 1,
            block_cache_bytes: 1 << 20,
            memtable_bytes: 1 << 20,
        };
        let store = Store::open(dir.path(), false, retention).unwrap();
        (dir, Arc::new(store))
    }

    #[test]
    fn a_key_is_stored_hashed_verified_and_revoked() {
        let (_dir, store) = store();
        let keys = KeyStore::open(store.clone()).unwrap();
        assert!(!keys.any_active());
        let new = keys.create("crm-sync", "exporter", "cli", 1).unwrap();
        let key = new.key.expose().to_owned();
        assert!(key.starts_with("tsk_") && key.len() > 50, "{key}");
        assert_eq!(format!("{:?}", new.key), "Secret(***)");
        // The store never holds the key, only its hash.
        let raw: Vec<u8> = store
            .scan_from(CF_ACCESS, b"")
            .flat_map(|kv| kv.unwrap().1.to_vec())
            .collect();
        // `tsk_<id>_<secret>`; the secret's own alphabet has `_` in it.
        let secret = key.splitn(3, '_').nth(2).unwrap();
        assert!(secret.len() >= 43, "{key}");
        assert!(!String::from_utf8_lossy(&raw).contains(secret));
        assert_eq!(keys.verify(&key).unwrap().role, "exporter");
        // One character off, another id, garbage: refused.
        let mut wrong = key.clone();
        wrong.pop();
        wrong.push(if key.ends_with('A') { 'B' } else { 'A' });
        assert!(keys.verify(&wrong).is_none());
        assert!(keys.verify("tsk_aaaaaaaaaa_x").is_none());
        assert!(keys.verify("").is_none());
        assert_eq!(
            keys.create("crm-sync", "reader", "cli", 2).err(),
            Some(KeyError::NameTaken("crm-sync".into()))
        );
        // Reopened from the store: the same keys.
        let again = KeyStore::open(store.clone()).unwrap();
        assert!(again.verify(&key).is_some());
        again.revoke("crm-sync", 3).unwrap();
        assert!(again.verify(&key).is_none());
        assert!(KeyStore::open(store).unwrap().verify(&key).is_none());
        assert!(matches!(again.revoke("nobody", 4), Err(KeyError::NotFound(_))));
    }

    #[test]
    fn a_generated_key_is_imported_once() {
        let (_dir, store) = store();
        let keys = KeyStore::open(store).unwrap();
        let key = KeyStore::generate();
        assert!(keys.verify(key.expose()).is_none());
        assert_eq!(keys.import(key.expose(), "bootstrap", "admin", 1), Ok(true));
        assert_eq!(keys.import(key.expose(), "bootstrap", "admin", 2), Ok(false));
        assert_eq!(keys.verify(key.expose()).unwrap().role, "admin");
        keys.revoke("bootstrap", 3).unwrap();
        // Imported again at the next start: a revoked key stays revoked.
        assert_eq!(keys.import(key.expose(), "bootstrap", "admin", 4), Ok(false));
        assert!(keys.verify(key.expose()).is_none());
        assert!(keys.import("tsk_short_x", "b2", "admin", 5).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("ops@shop-1.cn").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
    }

    /// Two nodes' records of the same keys, merged in either order, give one result: a key
    /// either lacks is added, a revocation wins (the earliest), nothing is merged twice,
    /// and another key under a known id is refused. A failed publication makes no key.
    #[test]
    fn records_merged_in_any_order_agree_and_a_revocation_wins() {
        let (_d1, s1) = store();
        let (_d2, s2) = store();
        let (a, b) = (KeyStore::open(s1).unwrap(), KeyStore::open(s2.clone()).unwrap());
        let one = a.create("one", "reader", "t", 1).unwrap();
        let two = b.create("two", "admin", "t", 2).unwrap();
        let live_one = a.records()[0].clone();
        a.revoke("one", 5).unwrap();
        let revoked_one = a.records()[0].clone();
        let mut later = revoked_one.clone();
        later.revoked_at = Some(9);
        // b takes the revocation before the key itself, and a later revocation after.
        for record in [&revoked_one, &live_one, &later] {
            b.merge(record).unwrap();
        }
        for record in b.records() {
            a.merge(&record).unwrap();
        }
        assert_eq!(a.records(), b.records());
        assert_eq!(
            b.records()
                .iter()
                .find(|r| r.id == one.info.id)
                .unwrap()
                .revoked_at,
            Some(5)
        );
        assert!(b.verify(one.key.expose()).is_none(), "revoked everywhere");
        assert_eq!(a.verify(two.key.expose()).unwrap().role, "admin");
        assert!(!a.merge(&live_one).unwrap(), "nothing new");
        // Kept in the store: a reopened store has the merged keys.
        assert_eq!(KeyStore::open(s2).unwrap().records(), b.records());
        let mut impostor = live_one.clone();
        impostor.hash = hash("tsk_another_key");
        assert!(matches!(a.merge(&impostor), Err(KeyError::Invalid(_))));
        let unshared = b.create_then("three", "reader", "t", 3, |_| {
            Err(KeyError::Unshared("down".into()))
        });
        assert!(matches!(unshared, Err(KeyError::Unshared(_))));
        assert!(b.records().iter().all(|r| r.name != "three"), "no key made");
        let unrevoked = b.revoke_then("two", 4, |_| Err(KeyError::Unshared("down".into())));
        assert!(unrevoked.is_err());
        assert!(b.verify(two.key.expose()).is_some(), "still live");
    }
}
