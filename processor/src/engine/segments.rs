//! Saved segments managed at runtime: create, update and delete one segment without touching
//! the rest of the rule set.
//!
//! The segment's definition is replaced in (or appended to, or cut from) the rule text. When
//! its value can only change when its inputs do — it reads tags, segments, profile attributes
//! and traits that do not move with time, and no other definition reads it — its membership
//! is computed at once from current state through the membership index (bitmap plan, the
//! remaining candidates judged one by one), and every enter and exit is a `rule_change` change
//! committed in one batch with the new rule text — or, when more customers than
//! `EngineConfig::segment_round` enter or exit, the rule text alone, after which the segment
//! is filled round by round (`Engine::segment_fill_step`), each round judging its customers
//! from their state at that moment. Anything else (a segment with its own
//! windows or `since`, or one other definitions read) goes through a full rule change: every
//! customer is re-evaluated over their retained history by the backfill.

use std::sync::Arc;

use rules::{CompiledRules, DefId, DefKind, Node};

use super::query::with_segment;
use super::{
    positions, Engine, EngineError, Proposal, QueryError, RuleChange, RuleDiff, RuleEdit, RuleVersion,
    META_SEGMENT_FILL,
};
use crate::change::{Cause, MemberKind, Op};
use crate::codec::{CodecError, Reader, Writer};
use crate::state::Membership;
use crate::store::{StoreError, CF_META};

/// How a segment change was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "applied", rename_all = "snake_case")]
pub enum SegmentUpdate {
    /// Membership computed now; the changes are committed.
    Immediate { members: u64, entered: u64, exited: u64 },
    /// A full rule change: the backfill re-evaluates every customer (see its progress).
    Backfill,
}

/// A saved segment as listed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedSegment {
    pub name: String,
    pub expr: String,
    pub members: u64,
}

/// A saved segment whose change is committed round by round: the customers numbered from
/// `next` on are still to be judged (see [`super::EngineConfig::segment_round`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SegmentFill {
    pub name: Arc<str>,
    pub next: u32,
}

impl SegmentFill {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u64(u64::from(self.next));
        w.str(&self.name);
        w.buf
    }

    pub fn decode(raw: &[u8]) -> Result<SegmentFill, StoreError> {
        let mut r = Reader::new(raw);
        let next = u32::try_from(r.u64()?).map_err(|_| CodecError("bad segment fill"))?;
        Ok(SegmentFill {
            name: Arc::from(r.str()?),
            next,
        })
    }
}

/// Whether `node`'s value changes only when a tag, segment, profile attribute or static
/// trait it reads does (no aggregate, no time-dependent trait).
fn static_inputs(node: &Node, rules: &CompiledRules) -> bool {
    match node {
        Node::Agg(_) => false,
        Node::Def(id) => {
            let def = rules.def(*id);
            def.kind.has_members() || !def.time_dependent
        }
        Node::List(items) => items.iter().all(|n| static_inputs(n, rules)),
        Node::Not(n) | Node::Neg(n) => static_inputs(n, rules),
        Node::Binary(_, a, b) => static_inputs(a, rules) && static_inputs(b, rules),
        Node::Const(_) | Node::Profile(_) | Node::Has(_) | Node::Prop(_) => true,
    }
}

fn dependents(rules: &CompiledRules, id: DefId) -> Vec<String> {
    rules
        .defs()
        .iter()
        .filter(|d| d.deps.contains(&id))
        .map(|d| d.name.to_string())
        .collect()
}

impl super::ReadHandle {
    /// The saved segments of the published rule set, with their member counts: read
    /// beside the engine, so not held up by a long catch-up of timers.
    pub fn saved_segments(&self) -> Vec<SavedSegment> {
        self.saved_segments_in(None)
    }

    /// [`Self::saved_segments`] with members counted in `partitions` only (a node of a
    /// cluster answers for the partitions it owns); `None`: all.
    pub fn saved_segments_in(&self, partitions: Option<&[u32]>) -> Vec<SavedSegment> {
        let within = partitions.map(|p| self.numbers_of_partitions(p));
        let rules = self.rules();
        let index = self.index().read();
        rules
            .defs()
            .iter()
            .filter(|d| d.kind == DefKind::Segment)
            .map(|d| SavedSegment {
                name: d.name.to_string(),
                expr: d
                    .source
                    .split_once('=')
                    .map_or(String::new(), |(_, e)| e.trim().to_owned()),
                members: index
                    .set(&d.name)
                    .map_or(0, |s| within.as_ref().map_or(s.len(), |w| s.intersection_len(w))),
            })
            .collect()
    }
}

impl Engine {
    /// [`ReadHandle::saved_segments`](super::ReadHandle::saved_segments).
    pub fn saved_segments(&self) -> Vec<SavedSegment> {
        self.reader().saved_segments()
    }

    /// The rule text without the definition of `name`, which must be a segment if defined.
    fn text_without(&self, name: &str) -> Result<Option<String>, EngineError> {
        let Some(id) = self.rules.lookup(name) else {
            return Ok(None);
        };
        let def = self.rules.def(id);
        if def.kind != DefKind::Segment {
            let what = if def.kind == DefKind::Trait {
                "a trait"
            } else {
                "a tag"
            };
            return Err(EngineError::Conflict(format!(
                "`{name}` is {what}; change it through PUT /v1/rules"
            )));
        }
        let source = self.rules.source();
        Ok(Some(format!(
            "{}{}",
            &source[..def.span.start],
            &source[def.span.end..]
        )))
    }

    /// Creates or replaces `segment NAME = EXPR` (as an anonymous author).
    pub fn put_segment(&mut self, name: &str, expr: &str) -> Result<SegmentUpdate, QueryError> {
        self.put_segment_as(name, expr, &RuleEdit::by("anonymous"))
            .map(|(update, _)| update)
    }

    /// Creates or replaces `segment NAME = EXPR` by `edit`'s author: the next version of the
    /// rule set.
    pub fn put_segment_as(
        &mut self,
        name: &str,
        expr: &str,
        edit: &RuleEdit,
    ) -> Result<(SegmentUpdate, RuleVersion), QueryError> {
        let proposal = self.propose_put_segment(name, expr, edit)?;
        self.apply_proposal(proposal)
    }

    /// [`Engine::put_segment_as`] checked but not applied (see [`Engine::propose_rules`]): a
    /// segment whose members the index gives is a [`RuleChange::Segment`], any other a full
    /// rule change.
    pub fn propose_put_segment(
        &self,
        name: &str,
        expr: &str,
        edit: &RuleEdit,
    ) -> Result<Proposal, QueryError> {
        self.admit_edit(edit)?;
        self.admit_segment_edit()?;
        if CompiledRules::compile(&format!("segment {name} = true")).is_err() {
            return Err(EngineError::Conflict(format!(
                "`{name}` is not a valid name (letters, digits and `_`, not starting with a digit)"
            ))
            .into());
        }
        let base = self
            .text_without(name)?
            .unwrap_or_else(|| self.rules.source().to_owned());
        let (compiled, _) = with_segment(&base, name, expr).map_err(QueryError::Invalid)?;
        let id = compiled.lookup(name).expect("just defined");
        let node = compiled
            .def(id)
            .expr
            .as_ref()
            .expect("a segment has an expression");
        let action = format!("put_segment {name}");
        if !static_inputs(node, &compiled) || !dependents(&compiled, id).is_empty() {
            return Ok(self.propose_rules(compiled.source(), edit, action)?);
        }
        Ok(Proposal {
            change: RuleChange::Segment {
                name: name.to_owned(),
            },
            version: self.next_version(&compiled, edit, action),
            generation: self.generation,
        })
    }

    /// Deletes a saved segment (as an anonymous author): every member exits.
    pub fn delete_segment(&mut self, name: &str) -> Result<SegmentUpdate, EngineError> {
        self.delete_segment_as(name, &RuleEdit::by("anonymous"))
            .map(|(update, _)| update)
    }

    /// Deletes a saved segment by `edit`'s author: every member exits, in the next version of
    /// the rule set.
    pub fn delete_segment_as(
        &mut self,
        name: &str,
        edit: &RuleEdit,
    ) -> Result<(SegmentUpdate, RuleVersion), EngineError> {
        let proposal = self.propose_delete_segment(name, edit)?;
        self.apply_proposal(proposal).map_err(|e| match e {
            QueryError::Engine(e) => e,
            other => EngineError::Conflict(other.to_string()),
        })
    }

    /// [`Engine::delete_segment_as`] checked but not applied (see [`Engine::propose_rules`]).
    pub fn propose_delete_segment(&self, name: &str, edit: &RuleEdit) -> Result<Proposal, EngineError> {
        self.admit_edit(edit)?;
        self.admit_segment_edit()?;
        let text = self
            .text_without(name)?
            .ok_or_else(|| EngineError::NotFound(format!("no segment `{name}`")))?;
        let id = self.rules.lookup(name).expect("defined");
        let users = dependents(&self.rules, id);
        if !users.is_empty() {
            return Err(EngineError::Conflict(format!(
                "`{name}` is used by {}; change those first",
                users.join(", ")
            )));
        }
        let compiled = CompiledRules::compile(&text).map_err(EngineError::Rules)?;
        Ok(Proposal {
            change: RuleChange::Segment {
                name: name.to_owned(),
            },
            version: self.next_version(&compiled, edit, format!("delete_segment {name}")),
            generation: self.generation,
        })
    }

    /// Applies a [`RuleChange::Segment`] proposal: segment `name`'s members computed from the
    /// index under the proposal's text (none when it deletes the segment), the rest of the
    /// rules unchanged. A segment still being filled here is finished first (another node
    /// may have finished it before proposing this).
    pub(super) fn apply_segment(
        &mut self,
        name: &str,
        proposal: Proposal,
    ) -> Result<(SegmentUpdate, RuleVersion), QueryError> {
        while self.segment_fill.is_some() {
            self.segment_fill_step()?;
        }
        let compiled = CompiledRules::compile(&proposal.version.text).map_err(EngineError::Rules)?;
        let members = match compiled.lookup(name) {
            Some(id) => self.reader().evaluate_set(&compiled, id, None, None)?,
            None => roaring::RoaringBitmap::new(),
        };
        let version = RuleVersion {
            diff: RuleDiff::between(&self.rules, &compiled),
            ..proposal.version
        };
        Ok(self.swap_segment(compiled, name, members, version)?)
    }

    /// Segments are edited one at a time while one is being filled round by round (its
    /// rounds judge it under the rule set they started with).
    fn admit_segment_edit(&self) -> Result<(), EngineError> {
        match &self.segment_fill {
            None => Ok(()),
            Some(fill) => Err(EngineError::Conflict(format!(
                "segment `{}` is still being filled ({} of {} customers judged); edit segments \
                 again once it is done (GET /readyz shows the progress)",
                fill.name,
                fill.next,
                self.index.read().customers()
            ))),
        }
    }

    /// Installs rules that differ from the current ones only in segment `name`, whose members
    /// are now `members`: one commit with the new text and every enter and exit — or, when
    /// more customers than [`super::EngineConfig::segment_round`] enter or exit, a commit of
    /// the new text alone, after which [`Engine::segment_fill_step`] judges and commits the
    /// customers round by round.
    fn swap_segment(
        &mut self,
        compiled: CompiledRules,
        name: &str,
        members: roaring::RoaringBitmap,
        version: RuleVersion,
    ) -> Result<(SegmentUpdate, RuleVersion), EngineError> {
        let before = self.index.read().set(name).cloned().unwrap_or_default();
        if compiled.window_layout() != self.rules.window_layout() {
            // The segment read aggregates no other definition reads: they leave the rules,
            // and the window state customers hold in memory is shaped by the old ones.
            // Reloaded from the store, it is found not to fit and rebuilt from the history.
            for shard in &mut self.shards {
                shard.cache.clear();
            }
        }
        let compiled = Arc::new(compiled);
        let old_rules = std::mem::replace(&mut self.rules, compiled);
        let name: Arc<str> = Arc::from(name);
        let changed = &before ^ &members;
        let fill = (changed.len() > self.segment_round() as u64).then(|| SegmentFill {
            name: name.clone(),
            next: 0,
        });
        let result = self.transact(|engine, batch| {
            let moved = match &fill {
                Some(fill) => {
                    batch.wb.put_cf(
                        engine.store.cf(CF_META),
                        META_SEGMENT_FILL.as_bytes(),
                        fill.encode(),
                    );
                    (0, 0)
                }
                None => engine.move_members(&name, &changed, &members)?,
            };
            engine.write_version(&mut batch.wb, &version);
            Ok(moved)
        });
        match result {
            Ok(((entered, exited), _)) => {
                self.published.set_rules(self.rules.clone());
                self.order_pos = positions(&self.rules);
                self.versioned(&version);
                let update = if fill.is_some() {
                    self.segment_fill = fill;
                    self.publish_backfill();
                    SegmentUpdate::Backfill
                } else {
                    SegmentUpdate::Immediate {
                        members: members.len(),
                        entered,
                        exited,
                    }
                };
                Ok((update, version))
            }
            Err(e) => {
                self.rules = old_rules;
                Err(e)
            }
        }
    }

    fn segment_round(&self) -> usize {
        self.config.segment_round.max(1)
    }

    /// Moves the customers of `changed` into segment `name` (those in `members`) or out of
    /// it (the others): each a `rule_change` change in the round being built. Returns how
    /// many entered and how many exited.
    fn move_members(
        &mut self,
        name: &Arc<str>,
        changed: &roaring::RoaringBitmap,
        members: &roaring::RoaringBitmap,
    ) -> Result<(u64, u64), EngineError> {
        let (mut entered, mut exited) = (0, 0);
        for (step, number) in changed.iter().enumerate() {
            let Some(id) = self.index.read().id(number).map(Arc::<str>::from) else {
                continue;
            };
            let enter = members.contains(number);
            let now = self.now_for(&id);
            self.with_worker(&id, step as u64, |w| {
                let mut state = w.take_customer(&id, now)?;
                let op = if enter {
                    let joined = Membership {
                        since: now,
                        expires_at: None,
                    };
                    state.members.insert(name.clone(), joined);
                    Op::Add
                } else {
                    state.members.remove(name);
                    Op::Remove
                };
                let (kind, cause) = (MemberKind::Segment, Cause::RuleChange);
                w.record_change(&id, kind, name.clone(), op, now, &cause);
                w.put_back(id.clone(), state);
                Ok(())
            })?;
            if enter {
                entered += 1;
            } else {
                exited += 1;
            }
        }
        Ok((entered, exited))
    }

    /// One round of a segment being filled: the next [`super::EngineConfig::segment_round`]
    /// customers (by number) are judged against the segment as the rules now define it —
    /// from their current state, so events applied since the change are counted — and those
    /// whose membership differs enter or exit, committed with the fill's progress. Returns
    /// how many customers entered or exited.
    pub(super) fn segment_fill_step(&mut self) -> Result<usize, EngineError> {
        let Some(fill) = self.segment_fill.clone() else {
            return Ok(0);
        };
        self.settle();
        let customers = self.index.read().customers();
        let end = fill
            .next
            .saturating_add(u32::try_from(self.segment_round()).unwrap_or(u32::MAX))
            .min(customers);
        let range = fill.next..end;
        let rules = self.rules.clone();
        let members = match rules.lookup(&fill.name) {
            Some(id) if rules.def(id).kind == DefKind::Segment => {
                self.reader()
                    .evaluate_set(&rules, id, None, Some(range.clone()))?
            }
            _ => roaring::RoaringBitmap::new(),
        };
        let mut changed = self.index.read().set(&fill.name).cloned().unwrap_or_default();
        let mut within = roaring::RoaringBitmap::new();
        within.insert_range(range);
        changed &= &within;
        changed ^= &members;
        let done = end >= customers;
        self.transact(|engine, batch| {
            engine.move_members(&fill.name, &changed, &members)?;
            let (cf, key) = (engine.store.cf(CF_META), META_SEGMENT_FILL.as_bytes());
            if done {
                batch.wb.delete_cf(cf, key);
            } else {
                let next = SegmentFill {
                    name: fill.name.clone(),
                    next: end,
                };
                batch.wb.put_cf(cf, key, next.encode());
            }
            Ok(())
        })?;
        self.segment_fill = (!done).then(|| SegmentFill {
            name: fill.name.clone(),
            next: end,
        });
        self.publish_backfill();
        Ok(changed.len() as usize)
    }

    /// How far a segment being filled round by round has come.
    pub(super) fn segment_fill_progress(&self) -> Option<(u64, u64)> {
        let fill = self.segment_fill.as_ref()?;
        let customers = u64::from(self.index.read().customers());
        Some((u64::from(fill.next), customers.max(u64::from(fill.next))))
    }
}
