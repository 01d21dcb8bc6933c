//! Every setting of `tagstream serve` and `replay`, with its default, in one place.
//!
//! Precedence: a command-line flag, then the `--config` TOML file, then the default below.
//! `deploy/tagstream.toml` lists every key with its default value.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use processor::{ClockMode, EngineConfig, EventLimits};
use serde::Deserialize;

/// The settings file. Unknown keys are errors, so a typo does not silently fall back to a
/// default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Where the RocksDB store lives.
    pub data_dir: PathBuf,
    /// The rule file: the rule set of a new store. A store keeps its rule set and the runtime
    /// edits made since the file was applied; a file that changed since is refused (with the
    /// diff) unless `--replace-rules` or `rules_source = "file"`.
    pub rules: Option<PathBuf>,
    /// Who owns the rule set: `store` (runtime edits through the API, versioned in the store)
    /// or `file` (the rule file is the source of truth: it replaces the stored set at every
    /// start, and runtime edits are refused).
    pub rules_source: RulesSource,
    /// The tracking plan events are judged against (docs/rules.md, "Tracking plan"); none:
    /// events are only checked against `[limits]`.
    pub tracking_plan: Option<PathBuf>,
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// In a group of several (`[kafka] state_topic`): the URL the other nodes reach this
    /// one's API at, e.g. "http://tagstream-0.tagstream:8080"; "" derives it from `listen`
    /// (its port, and its address or, when that is 0.0.0.0, the host name).
    pub advertise: String,
    /// `wall` or `event`.
    pub clock: ClockMode,
    /// fsync the write-ahead log on every commit (acknowledged means on disk).
    pub sync_writes: bool,
    pub limits: Limits,
    pub retention: RetentionSettings,
    pub cache: CacheSettings,
    pub engine: EngineSettings,
    pub kafka: KafkaFileSettings,
    pub access: AccessSettings,
    pub webhooks: WebhookSettings,
    pub tls: TlsSettings,
    pub identity: IdentitySettings,
}

/// `[identity]`: the identifier types events may carry in `ids`. Each
/// `[identity.types.NAME]` adds a type or changes a built-in one (`customer_id`,
/// `member_no`, `unionid`, `phone`, `email`, `openid`, `device_id`); a key left out keeps the
/// built-in's value (a new type: rank 50, `exact`, no limit).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentitySettings {
    /// Identifier lookups kept in memory (about 100 bytes each).
    pub cache_entries: Option<usize>,
    pub types: std::collections::BTreeMap<String, IdTypeSettings>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdTypeSettings {
    /// The survivor of a merge is the customer whose best identifier ranks highest.
    pub rank: Option<u32>,
    pub normaliser: Option<NormaliserName>,
    /// Most identifiers of the type one customer owns; 0: no limit.
    pub max_per_customer: Option<usize>,
    /// `phone`: the home country code, dropped from numbers (`+86 138…` is `138…`).
    pub country_code: Option<String>,
    /// `phone`: the digits of a home number without the country code.
    pub national_digits: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormaliserName {
    Phone,
    Email,
    Exact,
}

impl IdentitySettings {
    /// The built-in types with the file's changes and additions.
    pub fn config(&self) -> processor::identity::IdentityConfig {
        use processor::identity::{IdType, IdentityConfig, Normaliser};
        let mut config = IdentityConfig::default();
        if let Some(entries) = self.cache_entries {
            config.cache_entries = entries;
        }
        for (name, set) in &self.types {
            let i = match config.position(name) {
                Some(i) => i,
                None => {
                    config.types.push(IdType {
                        name: name.as_str().into(),
                        rank: 50,
                        normaliser: Normaliser::Exact,
                        max_per_customer: None,
                    });
                    config.types.len() - 1
                }
            };
            let t = &mut config.types[i];
            if let Some(rank) = set.rank {
                t.rank = rank;
            }
            if let Some(max) = set.max_per_customer {
                t.max_per_customer = (max > 0).then_some(max);
            }
            let (code, digits) = match &t.normaliser {
                Normaliser::Phone {
                    country_code,
                    national_digits,
                } => (country_code.clone(), *national_digits),
                _ => ("86".to_owned(), 11),
            };
            let kind = set.normaliser.unwrap_or(match t.normaliser {
                Normaliser::Phone { .. } => NormaliserName::Phone,
                Normaliser::Email => NormaliserName::Email,
                Normaliser::Exact => NormaliserName::Exact,
            });
            t.normaliser = match kind {
                NormaliserName::Phone => Normaliser::Phone {
                    country_code: set.country_code.clone().unwrap_or(code),
                    national_digits: set.national_digits.unwrap_or(digits),
                },
                NormaliserName::Email => Normaliser::Email,
                NormaliserName::Exact => Normaliser::Exact,
            };
        }
        config
    }
}

/// `[tls]`: HTTPS for the API (both files, or neither).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// The certificate chain, PEM, leaf first. Reloaded on SIGHUP.
    pub cert_file: Option<PathBuf>,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// In a group of several: the CA certificates (PEM) that the other nodes' certificates
    /// are verified against when a request is sent on to them over https (besides the
    /// built-in roots).
    pub peer_ca_file: Option<PathBuf>,
}

impl TlsSettings {
    pub fn files(&self) -> anyhow::Result<Option<crate::tls::TlsFiles>> {
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Ok(Some(crate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            })),
            (None, None) => Ok(None),
            _ => anyhow::bail!("[tls] needs both cert_file and key_file"),
        }
    }

    /// How this node verifies the others' certificates: the built-in roots and
    /// `peer_ca_file`'s.
    pub fn peer_client(&self) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
        let extra = match &self.peer_ca_file {
            Some(path) => crate::tls::read_certificates(path)
                .with_context(|| format!("[tls] peer_ca_file {}", path.display()))?,
            None => Vec::new(),
        };
        query_api::webhooks::tls_client(&extra).map_err(anyhow::Error::msg)
    }
}

/// `[access]`: API keys, roles, field masking and per-key limits (docs/security.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessSettings {
    /// `auto` (keys required once one exists; open before that only on loopback),
    /// `required`, or `off`.
    pub auth: query_api::access::AuthMode,
    /// Serve open (no keys) on a non-loopback address.
    pub allow_open: bool,
    /// `/metrics` without a key.
    pub metrics_open: bool,
    /// Field policies (`show`, `mask`, `hide`) for profile attributes and `customer_id`,
    /// for every role that does not set the field itself.
    pub fields: std::collections::BTreeMap<String, query_api::access::FieldPolicy>,
    /// Custom roles (with `permissions`), and field policies of built-in ones.
    pub roles: std::collections::BTreeMap<String, query_api::access::RoleSettings>,
    pub limits: AccessLimits,
    /// A file with one key (`tagstream keys generate`), made an admin key at start, once.
    pub bootstrap_key_file: Option<PathBuf>,
}

/// `[access.limits]`, per key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLimits {
    /// Requests per second a key may sustain; 0: unlimited.
    pub requests_per_second: f64,
    pub burst: f64,
    /// Exports and SQL statements a key may run at once.
    pub concurrent_exports: usize,
    /// Failed authentications per minute from one client address that are audited one by
    /// one; past it: 429, and the count goes into that address's next audit record.
    pub failed_auth_per_minute: f64,
}

impl Default for AccessSettings {
    fn default() -> Self {
        let d = query_api::access::AccessConfig::default();
        AccessSettings {
            auth: d.auth,
            allow_open: d.allow_open,
            metrics_open: d.metrics_open,
            fields: d.fields,
            roles: d.roles,
            limits: AccessLimits::default(),
            bootstrap_key_file: None,
        }
    }
}

impl Default for AccessLimits {
    fn default() -> Self {
        let d = query_api::access::LimitConfig::default();
        AccessLimits {
            requests_per_second: d.requests_per_second,
            burst: d.burst,
            concurrent_exports: d.concurrent_exports,
            failed_auth_per_minute: d.failed_auth_per_minute,
        }
    }
}

impl AccessSettings {
    pub fn config(&self) -> query_api::access::AccessConfig {
        query_api::access::AccessConfig {
            auth: self.auth,
            allow_open: self.allow_open,
            metrics_open: self.metrics_open,
            roles: self.roles.clone(),
            fields: self.fields.clone(),
            limits: query_api::access::LimitConfig {
                requests_per_second: self.limits.requests_per_second,
                burst: self.limits.burst,
                concurrent_exports: self.limits.concurrent_exports,
                failed_auth_per_minute: self.limits.failed_auth_per_minute,
            },
            bootstrap_key_file: self.bootstrap_key_file.clone(),
        }
    }
}

/// `[webhooks]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSettings {
    /// Non-public addresses (loopback, private, link-local ranges) webhooks may reach, as
    /// addresses or ranges: `["10.1.0.0/16", "127.0.0.1"]`. Public addresses need no entry.
    pub allow_targets: Vec<String>,
    /// More CAs (PEM) that `https://` receivers' certificates may chain to, besides the
    /// public roots built in: a company's internal CA.
    pub ca_file: Option<PathBuf>,
}

impl WebhookSettings {
    pub fn config(&self) -> anyhow::Result<query_api::webhooks::WebhookConfig> {
        let targets =
            query_api::targets::TargetPolicy::parse(&self.allow_targets).map_err(anyhow::Error::msg)?;
        let extra = match &self.ca_file {
            Some(path) => crate::tls::read_certificates(path).context("[webhooks] ca_file")?,
            None => Vec::new(),
        };
        Ok(query_api::webhooks::WebhookConfig {
            targets: std::sync::Arc::new(targets),
            tls: query_api::webhooks::tls_client(&extra).map_err(anyhow::Error::msg)?,
            ..Default::default()
        })
    }
}

/// librdkafka options: their values hold passwords, so `Debug` shows the names only.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct ClientOptions(pub std::collections::BTreeMap<String, String>);

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl Extend<(String, String)> for ClientOptions {
    fn extend<I: IntoIterator<Item = (String, String)>>(&mut self, items: I) {
        self.0.extend(items);
    }
}

/// Who owns the rule set (see [`Settings::rules_source`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RulesSource {
    Store,
    File,
}

/// `[engine]`: how evaluation is spread over threads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSettings {
    /// Engine workers evaluating in parallel; 0: one per core.
    pub workers: usize,
    /// Partitions customers are hashed to (Kafka's default partitioner on the customer id),
    /// each owned by one worker. Match the events topic's partition count.
    pub partitions: u32,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            workers: 0,
            partitions: EngineConfig::default().partitions,
        }
    }
}

impl EngineSettings {
    /// The workers to run: as set, or one per core.
    pub fn workers(&self) -> usize {
        match self.workers {
            0 => EngineConfig::default().workers,
            n => n,
        }
    }
}

/// `[kafka]`: consume events from a topic instead of (as well as) HTTP. Off unless `brokers`
/// is set. One processor per consumer group (see docs/kafka.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaFileSettings {
    /// Bootstrap servers, e.g. "kafka-1:9092,kafka-2:9092".
    pub brokers: Option<String>,
    /// The events topic, keyed by `customer_id`.
    pub topic: String,
    pub group_id: String,
    /// Where every change is published; "" publishes none.
    pub changes_topic: String,
    /// Where every rejected event is published with its reason; "" publishes none.
    pub dead_letter_topic: String,
    /// Where the state changelog is published (partition P's deltas to partition P; a store
    /// is restored from it with `tagstream partitions restore`); "" keeps none.
    pub state_topic: String,
    /// A partition's published deltas are folded into a checkpoint (one keyed record per
    /// key, so that the compacted topic stays bounded) once they hold this many MiB
    /// (fractions allowed).
    pub state_checkpoint_mb: f64,
    /// With `state_topic`: where the members of the group put their cards (address, owned
    /// partitions), one partition, compacted; "" is `GROUP_ID-members`.
    pub members_topic: String,
    /// With `state_topic`: where rule-set changes go to every node of the group, one
    /// partition, never deleted from; "" is `GROUP_ID-control`.
    pub control_topic: String,
    /// With `state_topic`: how many other members keep a warm copy of each partition, so
    /// that a take-over reads only what followed the copy; 0 keeps none.
    pub standby_replicas: u32,
    /// With `state_topic`: how long a partition this node kept from when it owned it may
    /// stay here while another member owns it (and it is no standby copy), e.g. "10m".
    pub state_cleanup_delay: Duration,
    /// Events per engine batch, at most.
    pub max_batch: usize,
    /// Passed to librdkafka as they are: security.protocol, sasl.*, ssl.*, ... Never logged.
    pub options: ClientOptions,
    /// Options whose value is read from a file at start (a mounted secret), e.g.
    /// `"sasl.password" = "/run/secrets/kafka-password"`: the file's content without its
    /// trailing newline. An option may come from `options` or from here, not both.
    pub option_files: std::collections::BTreeMap<String, PathBuf>,
}

impl Default for KafkaFileSettings {
    fn default() -> Self {
        let k = processor::kafka::KafkaSettings::new("", "events", "tagstream");
        KafkaFileSettings {
            brokers: None,
            topic: k.topic,
            group_id: k.group_id,
            changes_topic: k.changes_topic.unwrap_or_default(),
            dead_letter_topic: k.dlq_topic.unwrap_or_default(),
            state_topic: k.state_topic.unwrap_or_default(),
            state_checkpoint_mb: (k.state_checkpoint_bytes >> 20) as f64,
            members_topic: String::new(),
            control_topic: String::new(),
            standby_replicas: k.standby_replicas,
            state_cleanup_delay: Duration(k.state_cleanup_delay.as_millis() as i64),
            max_batch: k.max_batch,
            options: Default::default(),
            option_files: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest HTTP request body, in bytes (413 beyond it).
    pub max_request_bytes: usize,
    /// Largest single event, in bytes of its JSON.
    pub max_event_bytes: usize,
    /// Deepest nesting of objects and arrays in an event.
    pub max_event_depth: usize,
    /// How far ahead of the clock an event's `ts` may be, e.g. "5m".
    pub future_tolerance: Duration,
    /// Most characters of `customer_id` and `event_id`.
    pub max_id_chars: usize,
    /// Most characters of an event `type`.
    pub max_type_chars: usize,
    /// Most characters of a property path or profile attribute name.
    pub max_name_chars: usize,
    /// Most characters of a string value in `props` or `profile`.
    pub max_string_chars: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// How long each customer's events are kept (windows, `lifetime`, backfill), e.g. "400d".
    pub history: Duration,
    /// How long an `event_id` is remembered for dedup, e.g. "7d".
    pub dedup_horizon: Duration,
    /// How long changes stay in the change log (by the engine's clock), e.g. "400d".
    pub changes_max_age: Duration,
    /// Most changes the change log keeps.
    pub changes_max_count: u64,
    /// How long dead letters are kept (by the wall clock), e.g. "30d".
    pub dead_letters_max_age: Duration,
    /// Most dead letters kept.
    pub dead_letters_max_count: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Customers kept in memory between batches (the least often used lately go first).
    pub customers: usize,
    /// What those customers may hold in memory (records, window queues), in MiB.
    pub memory_mb: usize,
    /// `memory_mb` bounds the engine's whole heap as the allocator counts it: the cached
    /// customers get what the rest of the heap (membership index, timers, batches in flight,
    /// the allocator's slack) leaves, never under a quarter of it. Lower memory, a smaller
    /// cache (bench/RESULTS.md, "[cache] memory_mb bounds the engine's heap").
    pub bound_heap: bool,
    /// RocksDB's block cache, in MiB.
    pub block_cache_mb: usize,
    /// RocksDB's memtables, all column families together, in MiB.
    pub memtable_mb: usize,
    /// Profile attributes kept as in-memory columns for segment queries and SQL.
    pub profile_columns: usize,
    /// Traits that read events whose values segment queries remember.
    pub trait_columns: usize,
}

/// A duration written as in the rule language (`"45m"`, `"7d"`) or as milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duration(pub i64);

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Duration;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration like \"45m\" or \"7d\", or milliseconds")
            }
            fn visit_i64<E: serde::de::Error>(self, ms: i64) -> Result<Duration, E> {
                if ms > 0 {
                    Ok(Duration(ms))
                } else {
                    Err(E::custom(format!("a duration must be positive, not {ms}")))
                }
            }
            fn visit_u64<E: serde::de::Error>(self, ms: u64) -> Result<Duration, E> {
                self.visit_i64(i64::try_from(ms).map_err(|_| E::custom("duration too large"))?)
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
                parse_duration(text).map(Duration).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Parses a duration as the rule language writes it: `"45m"`, `"7d"`, `"500ms"`.
pub fn parse_duration(text: &str) -> Result<i64, String> {
    rules::lexer::parse_duration(text)
        .ok_or_else(|| format!("`{text}` is not a duration like \"45m\" or \"7d\""))
}

impl Default for Settings {
    fn default() -> Self {
        let engine = EngineConfig::default();
        Settings {
            data_dir: PathBuf::from("./tagstream-data"),
            rules: None,
            rules_source: RulesSource::Store,
            tracking_plan: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            advertise: String::new(),
            clock: ClockMode::Wall,
            sync_writes: engine.sync_writes,
            limits: Limits::default(),
            retention: RetentionSettings::default(),
            cache: CacheSettings::default(),
            engine: EngineSettings::default(),
            kafka: KafkaFileSettings::default(),
            access: AccessSettings::default(),
            webhooks: WebhookSettings::default(),
            tls: TlsSettings::default(),
            identity: IdentitySettings::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        let event = EventLimits::default();
        Limits {
            max_request_bytes: query_api::ApiConfig::default().max_request_bytes,
            max_event_bytes: event.max_event_bytes,
            max_event_depth: event.max_depth,
            future_tolerance: Duration(event.future_tolerance_ms),
            max_id_chars: event.max_id_chars,
            max_type_chars: event.max_type_chars,
            max_name_chars: event.max_name_chars,
            max_string_chars: event.max_string_chars,
        }
    }
}

impl Default for RetentionSettings {
    fn default() -> Self {
        let engine = EngineConfig::default();
        RetentionSettings {
            history: Duration(engine.retention_ms),
            dedup_horizon: Duration(engine.dedup_horizon_ms),
            changes_max_age: Duration(engine.changes_retention.max_age_ms),
            changes_max_count: engine.changes_retention.max_entries,
            dead_letters_max_age: Duration(engine.dead_letters_retention.max_age_ms),
            dead_letters_max_count: engine.dead_letters_retention.max_entries,
        }
    }
}

impl Default for CacheSettings {
    fn default() -> Self {
        let engine = EngineConfig::default();
        CacheSettings {
            customers: engine.cache_customers,
            memory_mb: engine.cache_bytes >> 20,
            bound_heap: engine.bound_heap,
            block_cache_mb: engine.block_cache_bytes >> 20,
            memtable_mb: engine.memtable_bytes >> 20,
            profile_columns: engine.profile_columns,
            trait_columns: engine.trait_columns,
        }
    }
}

impl Settings {
    /// The defaults, overlaid with the file at `path` if given.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Settings> {
        let Some(path) = path else {
            return Ok(Settings::default());
        };
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("in the settings file {}", path.display()))
    }

    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            clock: self.clock,
            limits: EventLimits {
                max_event_bytes: self.limits.max_event_bytes,
                max_depth: self.limits.max_event_depth,
                future_tolerance_ms: self.limits.future_tolerance.0,
                max_id_chars: self.limits.max_id_chars,
                max_type_chars: self.limits.max_type_chars,
                max_name_chars: self.limits.max_name_chars,
                max_string_chars: self.limits.max_string_chars,
            },
            dedup_horizon_ms: self.retention.dedup_horizon.0,
            retention_ms: self.retention.history.0,
            cache_customers: self.cache.customers,
            cache_bytes: self.cache.memory_mb << 20,
            heap_probe: Some(processor::HeapProbe(crate::heap_committed)),
            bound_heap: self.cache.bound_heap,
            block_cache_bytes: self.cache.block_cache_mb << 20,
            memtable_bytes: self.cache.memtable_mb << 20,
            sync_writes: self.sync_writes,
            profile_columns: self.cache.profile_columns,
            trait_columns: self.cache.trait_columns,
            changes_retention: processor::LogRetention {
                max_age_ms: self.retention.changes_max_age.0,
                max_entries: self.retention.changes_max_count,
            },
            dead_letters_retention: processor::LogRetention {
                max_age_ms: self.retention.dead_letters_max_age.0,
                max_entries: self.retention.dead_letters_max_count,
            },
            workers: self.engine.workers(),
            partitions: self.engine.partitions.max(1),
            rules_file_authority: self
                .rules
                .as_ref()
                .filter(|_| self.rules_source == RulesSource::File)
                .map(|p| p.display().to_string()),
            initial_author: self
                .rules
                .as_ref()
                .map_or("initial".to_owned(), |p| format!("file:{}", p.display())),
            timers_per_round: EngineConfig::default().timers_per_round,
            timers_beside_events: EngineConfig::default().timers_beside_events,
            segment_round: EngineConfig::default().segment_round,
            identity: self.identity.config(),
            // Deltas are kept only where they are published.
            changelog: self.in_group(),
            // A partition moves between nodes with its clock (docs/cluster.md).
            clock_per_partition: self.in_group(),
            // Identity is resolved for the group by partition 0's owner (docs/cluster.md).
            resolver: self.in_group(),
        }
    }

    /// Whether this node shares its partitions with others: a broker and a state topic.
    fn in_group(&self) -> bool {
        self.kafka.brokers.as_deref().is_some_and(|b| !b.is_empty()) && !self.kafka.state_topic.is_empty()
    }

    /// The Kafka side, when `kafka.brokers` is set, with the option files read. An error
    /// names the option and the file, never a value.
    pub fn kafka_settings(&self) -> anyhow::Result<Option<processor::kafka::KafkaSettings>> {
        let k = &self.kafka;
        let Some(brokers) = k.brokers.as_deref().filter(|b| !b.is_empty()) else {
            return Ok(None);
        };
        let mut settings = processor::kafka::KafkaSettings::new(brokers, &k.topic, &k.group_id);
        settings.changes_topic = Some(k.changes_topic.clone()).filter(|t| !t.is_empty());
        settings.dlq_topic = Some(k.dead_letter_topic.clone()).filter(|t| !t.is_empty());
        settings.state_topic = Some(k.state_topic.clone()).filter(|t| !t.is_empty());
        let group_topic = |set: &str, suffix: &str| {
            settings.state_topic.as_ref().map(|_| {
                if set.is_empty() {
                    format!("{}-{suffix}", k.group_id)
                } else {
                    set.to_owned()
                }
            })
        };
        let (members, control) = (
            group_topic(&k.members_topic, "members"),
            group_topic(&k.control_topic, "control"),
        );
        settings.members_topic = members;
        settings.control_topic = control;
        settings.standby_replicas = k.standby_replicas;
        settings.state_cleanup_delay =
            std::time::Duration::from_millis(k.state_cleanup_delay.0.max(0) as u64);
        if !(k.state_checkpoint_mb.is_finite() && k.state_checkpoint_mb > 0.0) {
            anyhow::bail!(
                "`[kafka] state_checkpoint_mb` must be a positive number of MiB, not {}",
                k.state_checkpoint_mb
            );
        }
        settings.state_checkpoint_bytes = ((k.state_checkpoint_mb * 1048576.0) as u64).max(1);
        settings.max_batch = k.max_batch.max(1);
        settings.client_options = k.options.0.clone();
        for (option, path) in &k.option_files {
            if k.options.0.contains_key(option) {
                anyhow::bail!(
                    "Kafka option `{option}` is given both as a value and as a file ({}): keep one",
                    path.display()
                );
            }
            let value = std::fs::read_to_string(path)
                .with_context(|| format!("reading Kafka option `{option}` from {}", path.display()))?;
            let value = value.strip_suffix('\n').unwrap_or(&value);
            let value = value.strip_suffix('\r').unwrap_or(value);
            settings.client_options.insert(option.clone(), value.to_owned());
        }
        Ok(Some(settings))
    }

    /// The settings file with every key at its default, for `deploy/` and the docs.
    pub fn default_file() -> String {
        let d = Settings::default();
        format!(
            r#"# tagstream settings. Every key is optional; these are the defaults.
# Command-line flags override this file.

data_dir = "{data_dir}"
# rules = "deploy/rules/example.trl"   # the rule set of a new store
rules_source = "store"    # or "file": the rule file replaces the stored set at start, API edits refused
# tracking_plan = "deploy/rules/plan.toml"   # what events may carry (docs/rules.md)
listen = "{listen}"
advertise = ""             # in a group of several: the URL other nodes reach this one at; "" derives it from listen
clock = "wall"            # or "event": now is the greatest event time seen
sync_writes = true        # fsync the WAL on every commit

[limits]
max_request_bytes = {max_request_bytes}
max_event_bytes = {max_event_bytes}
max_event_depth = {max_event_depth}
future_tolerance = "5m"   # how far ahead of the clock an event's ts may be
max_id_chars = {max_id_chars}        # customer_id and event_id
max_type_chars = {max_type_chars}      # event type
max_name_chars = {max_name_chars}      # property path, profile attribute name
max_string_chars = {max_string_chars}   # string values in props and profile

[retention]
history = "400d"          # events kept per customer (windows, lifetime, backfill)
dedup_horizon = "7d"      # how long an event_id is remembered
changes_max_age = "400d"  # the change log: older changes are deleted (a cursor before them: 410)
changes_max_count = {changes_max_count}
dead_letters_max_age = "30d"
dead_letters_max_count = {dead_letters_max_count}

[cache]
customers = {customers}       # customers kept in memory between batches
memory_mb = {memory_mb}        # what they may hold: records and window queues
bound_heap = {bound_heap}       # memory_mb bounds the engine's whole heap: the cache gets what the rest leaves (a quarter at least)
block_cache_mb = {block_cache_mb}      # RocksDB block cache
memtable_mb = {memtable_mb}         # RocksDB memtables, all column families together
profile_columns = {profile_columns}      # profile attributes kept as columns for queries (4 B/customer each)
trait_columns = {trait_columns}         # event-reading traits whose values queries remember (16 B/customer each)

[engine]
workers = 0               # engine threads evaluating in parallel; 0: one per core
partitions = {partitions}           # customers hashed to partitions as Kafka's default partitioner does; match the topic

[kafka]                   # off unless brokers is set; nodes share a group with state_topic (docs/cluster.md)
# brokers = "localhost:9092"
topic = "{kafka_topic}"           # events, keyed by customer_id
group_id = "{kafka_group}"
changes_topic = "{kafka_changes}"  # every change as JSON, key customer_id; "" for none
dead_letter_topic = "{kafka_dlq}"  # rejected events, reason in headers; "" for none
state_topic = "{kafka_state}"  # the state changelog, one partition per engine partition, cleanup.policy=compact; "" for none
state_checkpoint_mb = {kafka_checkpoint}     # a partition's deltas are folded into keyed records past this many MiB
members_topic = ""        # with state_topic: the members' cards, one partition, compacted; "" is GROUP_ID-members
control_topic = ""        # with state_topic: rule-set changes for every node, one partition, compacted; "" is GROUP_ID-control
standby_replicas = 0      # with state_topic: other members keeping a warm copy of each partition (faster take-over)
state_cleanup_delay = "10m"  # with state_topic: a partition kept from when this node owned it goes once another has owned it this long
max_batch = {kafka_batch}           # events per engine batch

[kafka.options]           # passed to librdkafka as they are; never logged
# "security.protocol" = "SASL_SSL"
# "sasl.mechanism" = "SCRAM-SHA-512"
# "sasl.username" = "tagstream"
# "sasl.password" = "..."   # or, better, from a mounted secret:

[kafka.option_files]      # options read from a file at start (trailing newline dropped)
# "sasl.password" = "/run/secrets/kafka-password"
# "ssl.key.password" = "/run/secrets/kafka-key-password"

[access]                  # API keys, roles, masking (docs/security.md)
auth = "auto"             # keys required once one exists; "required"; "off"
allow_open = false        # serve without keys on a non-loopback address
metrics_open = true       # /metrics without a key
# bootstrap_key_file = "/run/secrets/tagstream-admin-key"   # `tagstream keys generate`; an admin key at start

[access.fields]           # for every role that does not set the field: "show", "mask", "hide"
# phone = "mask"
# customer_id = "mask"

# [access.roles.support]  # a custom role; built-in: ingest reader exporter editor monitor admin
# permissions = ["customers_read", "segments_read"]
# fields = {{ phone = "show" }}

[access.limits]           # per API key
requests_per_second = {rps}   # 0: unlimited
burst = {burst}
concurrent_exports = {exports}  # members exports and SQL statements at once
failed_auth_per_minute = {failed}   # per client address, audited one by one, then 429; 0: no limit

[tls]                     # HTTPS for the API; reloaded on SIGHUP
# cert_file = "/etc/tagstream/tls/cert.pem"
# key_file = "/etc/tagstream/tls/key.pem"
# peer_ca_file = "/etc/tagstream/tls/ca.pem"   # a group of several over https: CAs of the other nodes' certificates

[webhooks]
allow_targets = []        # non-public addresses webhooks may reach, e.g. ["10.1.0.0/16"]
# ca_file = "/etc/tagstream/internal-ca.pem"   # more CAs for https:// receivers

[identity]                # identifier types events carry in `ids` (docs/api.md, "Identity")
# cache_entries = 1000000 # identifier lookups kept in memory (about 100 B each; the whole graph while it fits in half)
# Built in: customer_id (rank 100), member_no (90, at most 1), unionid (80, 1),
# phone (70, 3), email (60, 3), openid (50, 5), device_id (10, 5).
# [identity.types.phone]
# rank = 70               # a merge's survivor is the customer with the best-ranked identifier
# normaliser = "phone"    # "phone", "email" or "exact"
# max_per_customer = 3    # more are not attached and no merge makes more; 0: no limit
# country_code = "86"     # phone: the home country code, dropped
# national_digits = 11    # phone: digits of a home number
# [identity.types.loyalty_card]   # a type of your own
# rank = 85
# max_per_customer = 1
"#,
            rps = d.access.limits.requests_per_second,
            burst = d.access.limits.burst,
            exports = d.access.limits.concurrent_exports,
            failed = d.access.limits.failed_auth_per_minute,
            data_dir = d.data_dir.display(),
            listen = d.listen,
            max_request_bytes = d.limits.max_request_bytes,
            max_event_bytes = d.limits.max_event_bytes,
            max_event_depth = d.limits.max_event_depth,
            max_id_chars = d.limits.max_id_chars,
            max_type_chars = d.limits.max_type_chars,
            max_name_chars = d.limits.max_name_chars,
            max_string_chars = d.limits.max_string_chars,
            changes_max_count = d.retention.changes_max_count,
            dead_letters_max_count = d.retention.dead_letters_max_count,
            customers = d.cache.customers,
            memory_mb = d.cache.memory_mb,
            bound_heap = d.cache.bound_heap,
            block_cache_mb = d.cache.block_cache_mb,
            memtable_mb = d.cache.memtable_mb,
            profile_columns = d.cache.profile_columns,
            trait_columns = d.cache.trait_columns,
            partitions = d.engine.partitions,
            kafka_topic = d.kafka.topic,
            kafka_group = d.kafka.group_id,
            kafka_changes = d.kafka.changes_topic,
            kafka_dlq = d.kafka.dead_letter_topic,
            kafka_state = d.kafka.state_topic,
            kafka_checkpoint = d.kafka.state_checkpoint_mb,
            kafka_batch = d.kafka.max_batch,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_file_parses_to_the_defaults() {
        let parsed: Settings = toml::from_str(&Settings::default_file()).unwrap();
        let defaults = Settings::default();
        assert_eq!(parsed.engine_config(), defaults.engine_config());
        assert_eq!(parsed.listen, defaults.listen);
        assert_eq!(parsed.data_dir, defaults.data_dir);
        assert_eq!(parsed.limits.max_request_bytes, defaults.limits.max_request_bytes);
    }

    /// The package directory at run time (a shared target dir may hold a build made from
    /// another clone).
    fn manifest_dir() -> PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
    }

    #[test]
    fn identifier_types_change_the_built_ins_and_add_new_ones() {
        let settings: Settings = toml::from_str(
            "[identity.types.phone]\ncountry_code = \"1\"\nnational_digits = 10\nmax_per_customer = 0\n\
             [identity.types.loyalty_card]\nrank = 85\nmax_per_customer = 1\n",
        )
        .unwrap();
        let config = settings.engine_config().identity;
        let phone = &config.types[config.position("phone").unwrap()];
        assert_eq!(phone.max_per_customer, None);
        assert_eq!(
            phone.normaliser.apply("+1 (415) 555-0100").as_deref(),
            Some("4155550100")
        );
        let card = &config.types[config.position("loyalty_card").unwrap()];
        assert_eq!((card.rank, card.max_per_customer), (85, Some(1)));
        let err = toml::from_str::<Settings>("[identity.types.phone]\nnormaliser = \"fuzzy\"\n").unwrap_err();
        assert!(err.to_string().contains("fuzzy"), "{err}");
    }

    #[test]
    fn the_committed_default_file_is_current() {
        let committed = std::fs::read_to_string(manifest_dir().join("deploy/tagstream.toml"))
            .expect("deploy/tagstream.toml");
        assert_eq!(
            committed,
            Settings::default_file(),
            "regenerate with `tagstream default-config`"
        );
    }

    #[test]
    fn kafka_is_off_until_brokers_are_set_and_options_pass_through() {
        assert_eq!(Settings::default().kafka_settings().unwrap(), None);
        let s: Settings = toml::from_str(
            "[kafka]\nbrokers = \"k1:9092,k2:9092\"\ntopic = \"crm-events\"\nchanges_topic = \"\"\n\
             [kafka.options]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.password\" = \"s3cret\"\n",
        )
        .unwrap();
        let k = s.kafka_settings().unwrap().unwrap();
        assert_eq!(
            (k.brokers.as_str(), k.topic.as_str(), k.group_id.as_str()),
            ("k1:9092,k2:9092", "crm-events", "tagstream")
        );
        assert_eq!(k.changes_topic, None, "an empty topic publishes nothing");
        assert_eq!(k.dlq_topic.as_deref(), Some("tagstream-dead-letters"));
        assert_eq!(k.state_topic, None, "no state changelog unless asked");
        assert!(!s.engine_config().changelog);
        let with_state: Settings = toml::from_str(
            "[kafka]\nbrokers = \"k1:9092\"\nstate_topic = \"crm-state\"\nstate_checkpoint_mb = 0.5\n",
        )
        .unwrap();
        let state = with_state.kafka_settings().unwrap().unwrap();
        assert_eq!(state.state_topic.as_deref(), Some("crm-state"));
        assert_eq!(state.state_checkpoint_bytes, 512 << 10);
        assert_eq!(k.state_checkpoint_bytes, 64 << 20, "the default");
        let none: Settings =
            toml::from_str("[kafka]\nbrokers = \"k1:9092\"\nstate_checkpoint_mb = 0\n").unwrap();
        let err = none.kafka_settings().unwrap_err().to_string();
        assert!(
            err.contains("state_checkpoint_mb") && err.contains("positive"),
            "{err}"
        );
        assert!(
            with_state.engine_config().changelog,
            "a published changelog is kept"
        );
        assert_eq!(k.client_options["security.protocol"], "SASL_SSL");
        assert_eq!(k.client_options["sasl.password"], "s3cret");
        // Nothing that prints the settings shows the password.
        assert!(!format!("{s:?}").contains("s3cret"));
        let err = toml::from_str::<Settings>("[kafka]\nbroker = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `broker`"), "{err}");
    }

    #[test]
    fn kafka_options_read_from_files_drop_the_trailing_newline_and_errors_never_show_values() {
        let dir = std::env::temp_dir().join(format!("tagstream-option-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let password = dir.join("kafka-password");
        std::fs::write(&password, "s3cret-from-file\n").unwrap();
        let file = |extra: &str| {
            toml::from_str::<Settings>(&format!(
                "[kafka]\nbrokers = \"k1:9093\"\n[kafka.options]\n\"security.protocol\" = \"SASL_SSL\"\n{extra}\
                 [kafka.option_files]\n\"sasl.password\" = {:?}\n",
                password.display().to_string()
            ))
            .unwrap()
        };
        let k = file("").kafka_settings().unwrap().unwrap();
        assert_eq!(k.client_options["sasl.password"], "s3cret-from-file");
        assert_eq!(k.client_options["security.protocol"], "SASL_SSL");
        assert!(!format!("{:?} {k:?}", file("")).contains("s3cret"));

        let twice = file("\"sasl.password\" = \"inline\"\n")
            .kafka_settings()
            .unwrap_err();
        let twice = format!("{twice:#}");
        assert!(twice.contains("`sasl.password` is given both"), "{twice}");
        assert!(!twice.contains("inline") && !twice.contains("s3cret"), "{twice}");

        std::fs::remove_file(&password).unwrap();
        let missing = format!("{:#}", file("").kafka_settings().unwrap_err());
        assert!(
            missing.contains("reading Kafka option `sasl.password` from"),
            "{missing}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_typo_or_a_bad_duration_is_an_error_that_names_it() {
        let err = toml::from_str::<Settings>("[cache]\ncustomer = 5")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `customer`"), "{err}");
        let err = toml::from_str::<Settings>("[retention]\nhistory = \"forever\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`forever` is not a duration"), "{err}");
        let s: Settings = toml::from_str("clock = \"event\"\n[retention]\nhistory = \"30d\"").unwrap();
        assert_eq!(s.engine_config().retention_ms, 30 * 86_400_000);
        assert_eq!(s.engine_config().clock, ClockMode::Event);
    }
}
