//! # The tagstream engine
//!
//! Events in, tags out, exactly as the contract (`shared/spec/semantics.md` sections 1, 2
//! and 4) says, with every batch committed atomically to RocksDB.
//!
//! The key types, in the order data flows through them:
//!
//! - [`event::parse_event`] validates and normalises one event, or rejects it with a reason;
//! - [`Engine`] applies batches of events (and the passing of time) to per-customer
//!   [`state::CustomerState`], evaluates the compiled rules through [`state::EngineFacts`],
//!   and records every tag and segment [`Change`] in the change log;
//! - [`store::Store`] is the RocksDB layout: customers, their retained events, timers,
//!   the change log, dedup keys and dead letters, one column family each.
//!
//! ```
//! use processor::{ClockMode, Engine, EngineConfig};
//!
//! let dir = std::env::temp_dir().join(format!("tagstream-doc-{}", std::process::id()));
//! let config = EngineConfig { clock: ClockMode::Event, sync_writes: false, ..Default::default() };
//! let rules = "tag lead_sla_breach = profile.lead_status == \"new\" and since(lead_created) > 45m";
//! let mut engine = Engine::open(&dir, Some(rules), config).unwrap();
//!
//! let lead = r#"{"customer_id": "13800000000", "type": "lead_created", "ts": 1744000000000,
//!                "profile": {"lead_status": "new"}}"#;
//! let outcome = engine.ingest(&[lead]).unwrap();
//! assert_eq!(outcome.accepted, 1);
//!
//! // Nobody called: 45 minutes and 1 millisecond later the tag is set by the timer.
//! let changes = engine.advance_clock(1744000000000 + 45 * 60_000 + 1).unwrap();
//! assert_eq!(changes[0].at, 1744000000000 + 45 * 60_000 + 1);
//! # drop(engine); std::fs::remove_dir_all(&dir).unwrap();
//! ```
//!
//! The core is synchronous: `ingest`, `advance_clock` and `tick` take the time they need
//! and return; the service drives them from one thread.

pub mod change;
pub mod changelog;
pub mod codec;
pub mod columns;
pub mod engine;
pub mod event;
pub mod identity;
pub mod index;
pub mod kafka;
pub mod partition;
pub mod quality;
pub mod service;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod window;
pub mod writes;

pub use change::{Cause, Change, MemberKind, Op};
pub use engine::{
    decode_group_cursor, encode_group_cursor, parse_cursor, Answer, BackfillProgress, BackupManifest,
    ClockMode, CustomerView, DeadLetter, DefinitionSummary, Delta, Engine, EngineConfig, EngineError,
    Explained, Explanation, ExportField, Finished, FiredTimers, GroupAppend, GroupDelta, GroupPage,
    GroupRecord, HandOverRequest, Handed, HandedOver, HeapProbe, HourActivity, IngestError, IngestOutcome,
    IngestRequest, Log, LogRetention, MembersPage, MovedEvent, NextChange, PartitionSummary, PartitionsPage,
    PendingHandover, PendingRecord, PendingSplit, Preview, PreviewCounts, Proposal, QueryError, QueryPage,
    ReadHandle, ReadVersions, Resolved, ResolvedEvent, ResolverRecord, RuleChange, RuleDiff, RuleEdit,
    RuleVersion, SavedSegment, SegmentUpdate, SplitRequest, TrimPlan, Trimmed, Unmerged, VersionSummary,
    BACKUP_MANIFEST, PARTITION_EXPORT_MAGIC,
};
pub use event::{parse_event, EventLimits, Rejection, ValidEvent};
pub use quality::{Intake, Quality};
pub use service::{EngineHandle, ServiceConfig, ServiceError};
pub use state::Membership;
pub use store::StoredEvent;
