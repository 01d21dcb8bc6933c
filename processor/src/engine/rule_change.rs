//! Rule changes: a new rule set is compiled and published, and every customer is brought up
//! to it — lazily when touched, and by the background sweep (`backfill_step`).

use super::*;

/// What a change of the rule set does to customers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RuleChange {
    /// The whole set changes (`PUT /v1/rules`, a rollback, a segment whose members the index
    /// cannot give): every customer is re-evaluated by the backfill.
    Rules,
    /// Only saved segment `name` changes (put or deleted); its members come from the index.
    Segment { name: String },
}

/// A change of the rule set, checked on the node it was asked of, to be applied by every
/// node that runs the rule set ([`Engine::apply_proposal`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Proposal {
    pub change: RuleChange,
    /// The version it makes: its number, author, action and text.
    pub version: RuleVersion,
    /// The generation customers are judged under once it is applied (moved on by a
    /// [`RuleChange::Rules`]): the same on every node of a group, so a customer restored from
    /// another node's state is current exactly when its generation is this one.
    pub generation: u64,
}

impl Worker<'_> {
    /// Re-evaluates a customer under a new rule set: event tags new to the rules are
    /// computed from the retained history, every tag and segment is re-evaluated, and the
    /// differences are `rule_change` changes.
    pub(super) fn upgrade(&mut self, customer: &Arc<str>, state: &mut CustomerState, now: i64) {
        let rules = self.ctx.rules;
        state.windows = None;
        let defined: HashSet<&str> = rules
            .defs()
            .iter()
            .filter(|d| d.kind == DefKind::EventTag)
            .map(|d| &*d.name)
            .collect();
        state.event_tags.retain(|name, _| defined.contains(&**name));
        for def in rules.defs().iter().filter(|d| d.kind == DefKind::EventTag) {
            if state.event_tags.contains_key(&def.name) {
                continue;
            }
            let tag = match_history(
                def.event_tag.as_ref().expect("event tag"),
                state,
                now,
                self.ctx.config.retention_ms,
            );
            if tag.last_ts.is_some() || !tag.future.is_empty() {
                state.event_tags.insert(def.name.clone(), tag);
            }
        }
        self.evaluate(customer, state, now, now, Scope::All, &Cause::RuleChange);
        state.generation = self.ctx.generation;
    }
}

impl Engine {
    /// Replaces the rule set (as an anonymous author, whatever version it had). Invalid rules
    /// are refused with every diagnostic and the old set stays. Customers are re-evaluated
    /// over their retained history: lazily when touched, and by [`Engine::backfill_step`]
    /// for everyone else.
    pub fn replace_rules(&mut self, text: &str) -> Result<(), EngineError> {
        self.replace_rules_as(text, &RuleEdit::by("anonymous"), "put_rules".to_owned())
            .map(drop)
    }

    /// [`Engine::replace_rules`] by `edit`'s author, if the version it read is still the
    /// current one: the new text becomes the next version, recorded with `action` and the
    /// diff in the same commit.
    pub fn replace_rules_as(
        &mut self,
        text: &str,
        edit: &RuleEdit,
        action: String,
    ) -> Result<RuleVersion, EngineError> {
        let proposal = self.propose_rules(text, edit, action)?;
        self.apply_rules(proposal)
    }

    /// The next version of the rule set with `text`, by `edit`'s author, checked (the
    /// version it read is current, the text compiles) but not applied: a node of a group
    /// sends it through the control topic, and every node applies it with
    /// [`Engine::apply_proposal`].
    pub fn propose_rules(
        &self,
        text: &str,
        edit: &RuleEdit,
        action: String,
    ) -> Result<Proposal, EngineError> {
        self.admit_edit(edit)?;
        let compiled = CompiledRules::compile(text).map_err(EngineError::Rules)?;
        Ok(Proposal {
            change: RuleChange::Rules,
            version: self.next_version(&compiled, edit, action),
            generation: versions::generation_of(compiled.source(), Some(self.generation)),
        })
    }

    /// Applies `proposal` (made here or on another node of the group): its version becomes
    /// the current one, numbered as proposed, and customers are brought up to it — all of
    /// them through the backfill for [`RuleChange::Rules`], or a saved segment's members
    /// from the index for [`RuleChange::Segment`]. Applying the version that already runs,
    /// under the same generation, changes nothing.
    pub fn apply_proposal(&mut self, proposal: Proposal) -> Result<(SegmentUpdate, RuleVersion), QueryError> {
        if self.rules_version == proposal.version.version
            && self.rules.source() == proposal.version.text
            && self.generation == proposal.generation
        {
            return Ok((SegmentUpdate::Backfill, proposal.version));
        }
        match &proposal.change {
            // A segment applied where the generation differs (a node that skipped versions
            // of the group's) re-evaluates everyone, under the proposal's generation.
            RuleChange::Segment { name } if proposal.generation == self.generation => {
                let name = name.clone();
                self.apply_segment(&name, proposal)
            }
            _ => Ok((SegmentUpdate::Backfill, self.apply_rules(proposal)?)),
        }
    }

    /// Installs `proposal`'s text for every customer: the version and the new generation
    /// committed, the backfill started.
    fn apply_rules(&mut self, proposal: Proposal) -> Result<RuleVersion, EngineError> {
        self.settle();
        let compiled = Arc::new(CompiledRules::compile(&proposal.version.text).map_err(EngineError::Rules)?);
        let version = RuleVersion {
            diff: RuleDiff::between(&self.rules, &compiled),
            ..proposal.version
        };
        let mut wb = WriteBatch::default();
        self.write_version(&mut wb, &version);
        self.store
            .put_meta_u64(&mut wb, META_GENERATION, proposal.generation);
        wb.put_cf(self.store.cf(CF_META), META_BACKFILL.as_bytes(), []);
        // The sweep re-evaluates every customer, a segment being filled among the rest.
        wb.delete_cf(self.store.cf(CF_META), META_SEGMENT_FILL.as_bytes());
        self.store.commit(wb)?;
        self.segment_fill = None;
        self.generation = proposal.generation;
        self.rules = compiled;
        self.published.set_rules(self.rules.clone());
        self.order_pos = positions(&self.rules);
        self.start_backfill();
        self.versioned(&version);
        Ok(version)
    }

    /// Starts (or restarts from the first customer) the sweep that brings every customer
    /// judged under another generation up to the current one.
    pub(super) fn start_backfill(&mut self) {
        self.backfill_cursor = Some(Vec::new());
        self.backfill_done = 0;
        self.backfill_total = self.store.estimate_keys(CF_CUSTOMERS);
        self.publish_backfill();
    }

    /// True while customers remain to be re-evaluated after a rule change.
    /// Also while a saved segment is being filled round by round.
    pub fn backfill_pending(&self) -> bool {
        self.backfill_cursor.is_some() || self.segment_fill.is_some()
    }

    /// How far the rule-change backfill (or a saved segment's fill) has come, while one runs.
    pub fn backfill_progress(&self) -> Option<BackfillProgress> {
        if let Some((done, total)) = self.segment_fill_progress() {
            return Some(BackfillProgress {
                customers_done: done,
                customers_estimated: total,
            });
        }
        self.backfill_cursor.as_ref().map(|_| BackfillProgress {
            customers_done: self.backfill_done,
            customers_estimated: self.backfill_total.max(self.backfill_done),
        })
    }

    /// Re-evaluates up to `max_customers` customers still on an older rule set, committing
    /// them as one batch. Returns how many were re-evaluated.
    /// A saved segment being filled goes first: one round of it is the step.
    pub fn backfill_step(&mut self, max_customers: usize) -> Result<usize, EngineError> {
        if self.segment_fill.is_some() {
            return self.segment_fill_step();
        }
        let Some(cursor) = self.backfill_cursor.clone() else {
            return Ok(0);
        };
        if self.backfill_total == 0 {
            // Resumed after a restart.
            self.backfill_total = self.store.estimate_keys(CF_CUSTOMERS);
        }
        let mut ids = Vec::new();
        let mut next_cursor = None;
        let mut passed = 0;
        for item in self.store.scan_from(CF_CUSTOMERS, &cursor) {
            let (key, value) = item?;
            if ids.len() == max_customers {
                next_cursor = Some(key.to_vec());
                break;
            }
            passed += 1;
            let partition = crate::partition::partition_of(&key, self.config.partitions);
            if self.parked.partitions.contains(&partition) {
                // Not owned here (kept from before, or a standby's copy): judged by its
                // owner, and swept once it is activated here.
                self.parked.swept_past.insert(partition);
                continue;
            }
            let generation = Reader::new(&value)
                .u8()
                .and_then(|_| Reader::new(&value[1..]).u64())
                .map_err(StoreError::from)?;
            // Another generation, older or (restored from a node ahead of this one) newer.
            if generation != self.generation {
                ids.push(Arc::<str>::from(String::from_utf8_lossy(&key).as_ref()));
            }
        }
        self.transact(|engine, batch| {
            for (step, id) in ids.iter().enumerate() {
                let now = engine.now_for(id);
                // Brought up to the current rules on the way.
                engine.with_worker(id, step as u64, |w| {
                    let state = w.take_customer(id, now)?;
                    w.put_back(id.clone(), state);
                    Ok(())
                })?;
            }
            let key = META_BACKFILL.as_bytes();
            match &next_cursor {
                Some(c) => batch.wb.put_cf(engine.store.cf(CF_META), key, c),
                None => batch.wb.delete_cf(engine.store.cf(CF_META), key),
            }
            Ok(())
        })?;
        self.backfill_cursor = next_cursor;
        self.backfill_done += passed;
        self.publish_backfill();
        Ok(ids.len())
    }
}
