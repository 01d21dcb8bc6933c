//! The rule set as one versioned document: file definitions and runtime segments alike. Every
//! change — `PUT /v1/rules`, a saved segment put or deleted, a rollback, a start with a rule
//! file that differs — is committed with its version record (number, author, instant, what it
//! did and the diff by definition) in the same batch as the new text, so the history cannot
//! disagree with what runs. A writer may name the version it edited (`If-Match`): a stale one
//! is refused, so two editors cannot overwrite each other unseen.

use serde::{Deserialize, Serialize};

use super::*;
use crate::writes::Writes;

/// The current version's number, in the meta column family.
const META_RULES_VERSION: &str = "rules_version";
/// The text of the rule file as last applied (at the store's creation or by a replacing
/// start): a start with the same file keeps the runtime edits made since.
const META_RULES_FILE: &str = "rules_file_applied";
/// Version records: `rules/v/` + the number, 20 digits, so they list in order.
const VERSION_PREFIX: &str = "rules/v/";

fn version_key(version: u64) -> String {
    format!("{VERSION_PREFIX}{version:020}")
}

/// Who changes the rule set, and which version they edited.
#[derive(Debug, Clone, Default)]
pub struct RuleEdit {
    /// The API key's name, `file:PATH` for a rule file, or `anonymous` on an open node.
    pub author: String,
    /// The version the writer read (`If-Match`); a change to any other is refused as stale.
    pub expect: Option<u64>,
}

impl RuleEdit {
    pub fn by(author: impl Into<String>) -> RuleEdit {
        RuleEdit {
            author: author.into(),
            expect: None,
        }
    }

    pub fn expecting(mut self, version: Option<u64>) -> RuleEdit {
        self.expect = version;
        self
    }
}

/// One definition as it appears in a diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefText {
    pub name: String,
    pub kind: DefKind,
    pub source: String,
}

/// A definition whose text changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefChange {
    pub name: String,
    pub kind: DefKind,
    pub before: String,
    pub after: String,
}

/// What a change did to the rule set, definition by definition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleDiff {
    pub added: Vec<DefText>,
    pub removed: Vec<DefText>,
    pub changed: Vec<DefChange>,
}

impl RuleDiff {
    /// The definitions `new` adds, drops and redefines against `old` (by name; a definition
    /// whose kind changes is a change).
    pub fn between(old: &CompiledRules, new: &CompiledRules) -> RuleDiff {
        let text = |d: &rules::compile::CompiledDef| DefText {
            name: d.name.to_string(),
            kind: d.kind,
            source: d.source.trim().to_owned(),
        };
        let mut diff = RuleDiff::default();
        for d in new.defs() {
            match old.lookup(&d.name).map(|id| old.def(id)) {
                None => diff.added.push(text(d)),
                Some(before) if before.source.trim() != d.source.trim() => diff.changed.push(DefChange {
                    name: d.name.to_string(),
                    kind: d.kind,
                    before: before.source.trim().to_owned(),
                    after: d.source.trim().to_owned(),
                }),
                Some(_) => {}
            }
        }
        diff.removed = old
            .defs()
            .iter()
            .filter(|d| new.lookup(&d.name).is_none())
            .map(text)
            .collect();
        diff
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    /// The diff as text for people: `+ def`, `- def`, `~ before` / `  after`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for d in &self.removed {
            out.push_str(&format!("- {}\n", d.source));
        }
        for d in &self.changed {
            out.push_str(&format!("- {}\n+ {}\n", d.before, d.after));
        }
        for d in &self.added {
            out.push_str(&format!("+ {}\n", d.source));
        }
        out
    }
}

/// One version of the rule set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleVersion {
    pub version: u64,
    pub author: String,
    /// Wall-clock ms when it was committed.
    pub at: i64,
    /// What made it: `put_rules`, `put_segment NAME`, `delete_segment NAME`,
    /// `rollback to N`, `rule file PATH`, `initial`.
    pub action: String,
    pub diff: RuleDiff,
    pub text: String,
}

/// A version as listed (without its text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionSummary {
    pub version: u64,
    pub author: String,
    pub at: i64,
    pub action: String,
    pub added: usize,
    pub removed: usize,
    pub changed: usize,
}

impl From<&RuleVersion> for VersionSummary {
    fn from(v: &RuleVersion) -> Self {
        VersionSummary {
            version: v.version,
            author: v.author.clone(),
            at: v.at,
            action: v.action.clone(),
            added: v.diff.added.len(),
            removed: v.diff.removed.len(),
            changed: v.diff.changed.len(),
        }
    }
}

/// The generation customers are judged under once `text` replaces the rules of generation
/// `previous` (`None`: a new store's first rule set). A customer is current when judged
/// under exactly the generation running, so what matters is that two generations are equal
/// only for the same rule text reached the same way: a hash of the text and the previous
/// generation, the same on every node — so a partition moved between two stores of the same
/// rule history needs no re-evaluation, and one moved between stores of different
/// histories is re-evaluated. At least 2^32 (never one of the counters stores kept before
/// generations were hashes) and below 2^40 (six bytes in a customer's record).
pub(super) fn generation_of(text: &str, previous: Option<u64>) -> u64 {
    const LOW: u64 = 1 << 32;
    const SPAN: u64 = (1 << 40) - LOW;
    // FNV-1a: stable across builds and machines, unlike the standard library's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let previous = previous.map(u64::to_le_bytes);
    for byte in previous.iter().flatten().chain(text.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    LOW + hash % SPAN
}

/// The current version, for replies and `ETag`s.
pub(super) fn current_version(store: &Store) -> Result<u64, StoreError> {
    store.meta_u64(META_RULES_VERSION)
}

impl Engine {
    /// The version of the rule set running now (0 before the first one was recorded).
    pub fn rules_version(&self) -> u64 {
        self.rules_version
    }

    /// The generation customers are judged under now (moved on by every change that
    /// re-evaluates them all).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The version running now as a proposal of itself (what a node offers a group whose
    /// control topic is empty); `None` before any version was recorded.
    pub fn current_proposal(&self) -> Result<Option<super::Proposal>, EngineError> {
        if self.rules_version == 0 {
            return Ok(None);
        }
        // A counter kept from before generations were hashes could be another store's too:
        // the group starts on a hashed one (everyone here re-evaluated once).
        let generation = if self.generation < 1 << 32 {
            generation_of(self.rules.source(), Some(self.generation))
        } else {
            self.generation
        };
        Ok(ReadVersions(&self.store)
            .get(self.rules_version)?
            .map(|version| super::Proposal {
                change: super::RuleChange::Rules,
                version,
                generation,
            }))
    }

    /// Refuses an edit of a stale version, or any runtime edit when a rule file is declared
    /// the source of truth.
    pub(super) fn admit_edit(&self, edit: &RuleEdit) -> Result<(), EngineError> {
        if let Some(file) = &self.config.rules_file_authority {
            if !edit.author.starts_with("file:") {
                return Err(EngineError::Conflict(format!(
                    "the rule set is managed by the rule file {file} (rules_source = \"file\"): \
                     edit the file and restart, or set rules_source = \"store\" to edit at runtime"
                )));
            }
        }
        match edit.expect {
            Some(expected) if expected != self.rules_version => Err(EngineError::Stale {
                expected,
                current: self.rules_version,
            }),
            _ => Ok(()),
        }
    }

    /// The record of `new` as the next version of the rule set.
    pub(super) fn next_version(&self, new: &CompiledRules, edit: &RuleEdit, action: String) -> RuleVersion {
        RuleVersion {
            version: self.rules_version + 1,
            author: edit.author.clone(),
            at: wall_ms(),
            action,
            diff: RuleDiff::between(&self.rules, new),
            text: new.source().to_owned(),
        }
    }

    /// Stages `version` in `wb`: the text, the record and the counter. The caller commits the
    /// batch and then calls [`Engine::versioned`].
    pub(super) fn write_version(&self, wb: &mut impl Writes, version: &RuleVersion) {
        let json = serde_json::to_vec(version).expect("a version serialises");
        let meta = self.store.cf(CF_META);
        wb.put(meta, META_RULES.as_bytes(), version.text.as_bytes());
        wb.put(meta, version_key(version.version).as_bytes(), &json);
        self.store.put_meta_u64(wb, META_RULES_VERSION, version.version);
    }

    /// Records that `version`'s batch committed.
    pub(super) fn versioned(&mut self, version: &RuleVersion) {
        self.rules_version = version.version;
        let d = &version.diff;
        tracing::info!(
            version = version.version,
            author = %version.author,
            action = %version.action,
            added = d.added.len(),
            removed = d.removed.len(),
            changed = d.changed.len(),
            "rule set changed"
        );
        tracing::debug!(version = version.version, "the rule set's diff:\n{}", d.render());
    }

    /// The first version of a store that has rules but no record of them (made before
    /// versions existed, or just created): the stored text as version 1.
    pub(super) fn record_first_version(&mut self, author: &str, action: &str) -> Result<(), EngineError> {
        let empty = CompiledRules::compile("").map_err(EngineError::Rules)?;
        let current = std::mem::replace(&mut self.rules, Arc::new(empty));
        let record = self.next_version(&current, &RuleEdit::by(author), action.to_owned());
        self.rules = current;
        let mut wb = WriteBatch::default();
        self.write_version(&mut wb, &record);
        self.store.commit(wb)?;
        self.versioned(&record);
        Ok(())
    }

    /// The rule file's text as last applied, if it was recorded.
    pub fn rule_file_applied(&self) -> Result<Option<String>, EngineError> {
        Ok(self
            .store
            .get(CF_META, META_RULES_FILE.as_bytes())?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Records `text` as the rule file's text last applied.
    pub fn mark_rule_file_applied(&self, text: &str) -> Result<(), EngineError> {
        let mut wb = WriteBatch::default();
        wb.put_cf(
            self.store.cf(CF_META),
            META_RULES_FILE.as_bytes(),
            text.as_bytes(),
        );
        Ok(self.store.commit(wb)?)
    }

    /// What replacing the rule set with `text` would change (the text's errors if it does
    /// not compile).
    pub fn diff_rules(&self, text: &str) -> Result<RuleDiff, Vec<Diagnostic>> {
        let new = CompiledRules::compile(text)?;
        Ok(RuleDiff::between(&self.rules, &new))
    }

    /// Sets the rule set back to `version`'s text: a new version whose action says so.
    pub fn rollback_rules(&mut self, version: u64, edit: &RuleEdit) -> Result<RuleVersion, EngineError> {
        let proposal = self.propose_rollback(version, edit)?;
        self.replace_rules_as(&proposal.version.text, edit, proposal.version.action)
    }

    /// [`Engine::rollback_rules`] checked but not applied (see [`Engine::propose_rules`]).
    pub fn propose_rollback(&self, version: u64, edit: &RuleEdit) -> Result<super::Proposal, EngineError> {
        self.admit_edit(edit)?;
        let old = ReadVersions(&self.store)
            .get(version)?
            .ok_or_else(|| EngineError::NotFound(format!("no rule-set version {version}")))?;
        self.propose_rules(&old.text, edit, format!("rollback to {version}"))
    }
}

/// Reads the version records (from any thread).
pub struct ReadVersions<'s>(pub &'s Store);

impl ReadVersions<'_> {
    pub fn get(&self, version: u64) -> Result<Option<RuleVersion>, EngineError> {
        let Some(bytes) = self.0.get(CF_META, version_key(version).as_bytes())? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| EngineError::Store(StoreError::Corrupt(format!("rule-set version {version}: {e}"))))
    }

    /// Versions newest first, those before `before` (all if `None`), at most `limit`.
    pub fn list(&self, before: Option<u64>, limit: usize) -> Result<Vec<VersionSummary>, EngineError> {
        let newest = current_version(self.0)?;
        let start = before.map_or(newest, |b| b.saturating_sub(1).min(newest));
        let mut out = Vec::new();
        for version in (1..=start).rev() {
            if out.len() == limit {
                break;
            }
            if let Some(v) = self.get(version)? {
                out.push(VersionSummary::from(&v));
            }
        }
        Ok(out)
    }
}
