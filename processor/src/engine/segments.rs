//! Saved segments managed at runtime: create, update and delete one segment without touching
//! the rest of the rule set.
//!
//! The segment's definition is replaced in (or appended to, or cut from) the rule text. When
//! its value can only change when its inputs do — it reads tags, segments, profile attributes
//! and traits that do not move with time, and no other definition reads it — its membership
//! is computed at once from current state through the membership index (bitmap plan, the
//! remaining candidates judged one by one), and every enter and exit is a `rule_change` change
//! committed in one batch with the new rule text. Anything else (a segment with its own
//! windows or `since`, or one other definitions read) goes through a full rule change: every
//! customer is re-evaluated over their retained history by the backfill.

use std::sync::Arc;

use rules::{CompiledRules, DefId, DefKind, Node};

use super::query::with_segment;
use super::{positions, Engine, EngineError, QueryError, META_RULES};
use crate::change::{Cause, MemberKind, Op};
use crate::state::Membership;
use crate::store::CF_META;

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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SavedSegment {
    pub name: String,
    pub expr: String,
    pub members: u64,
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

impl Engine {
    /// The saved segments of the rule set, with their member counts.
    pub fn saved_segments(&self) -> Vec<SavedSegment> {
        let index = self.index.read();
        self.rules
            .defs()
            .iter()
            .filter(|d| d.kind == DefKind::Segment)
            .map(|d| SavedSegment {
                name: d.name.to_string(),
                expr: d
                    .source
                    .split_once('=')
                    .map_or(String::new(), |(_, e)| e.trim().to_owned()),
                members: index.set(&d.name).map_or(0, |s| s.len()),
            })
            .collect()
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

    /// Creates or replaces `segment NAME = EXPR`.
    pub fn put_segment(&mut self, name: &str, expr: &str) -> Result<SegmentUpdate, QueryError> {
        if CompiledRules::compile(&format!("segment {name} = true")).is_err() {
            return Err(EngineError::Conflict(format!(
                "`{name}` is not a valid name (letters, digits and `_`, not starting with a digit)"
            ))
            .into());
        }
        let base = self
            .text_without(name)?
            .unwrap_or_else(|| self.rules.source().to_owned());
        let (compiled, text) = with_segment(&base, name, expr).map_err(QueryError::Invalid)?;
        let id = compiled.lookup(name).expect("just defined");
        let node = compiled
            .def(id)
            .expr
            .as_ref()
            .expect("a segment has an expression");
        if !static_inputs(node, &compiled) || !dependents(&compiled, id).is_empty() {
            self.replace_rules(&text)?;
            return Ok(SegmentUpdate::Backfill);
        }
        let members = self.reader().evaluate_set(&compiled, id, None)?;
        Ok(self.swap_segment(compiled, text, name, members)?)
    }

    /// Deletes a saved segment: every member exits.
    pub fn delete_segment(&mut self, name: &str) -> Result<SegmentUpdate, EngineError> {
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
        self.swap_segment(compiled, text, name, Default::default())
    }

    /// Installs rules that differ from the current ones only in segment `name`, whose members
    /// are now `members`: one commit with the new text and every enter and exit.
    fn swap_segment(
        &mut self,
        compiled: CompiledRules,
        text: String,
        name: &str,
        members: roaring::RoaringBitmap,
    ) -> Result<SegmentUpdate, EngineError> {
        let before = self.index.read().set(name).cloned().unwrap_or_default();
        if compiled.window_layout() != self.rules.window_layout() {
            // The segment read aggregates no other definition reads: they leave the rules,
            // and the window state customers hold in memory is shaped by the old ones.
            // Reloaded from the store, it is found not to fit and rebuilt from the history.
            for shard in &mut self.shards {
                shard.cache.clear();
            }
        }
        let old_rules = std::mem::replace(&mut self.rules, Arc::new(compiled));
        let now = self.now();
        let name: Arc<str> = Arc::from(name);
        let result = self.transact(|engine, batch| {
            let (mut entered, mut exited) = (0, 0);
            for (step, number) in (&before ^ &members).iter().enumerate() {
                let Some(id) = engine.index.read().id(number).map(Arc::<str>::from) else {
                    continue;
                };
                let enter = members.contains(number);
                engine.with_worker(&id, step as u64, |w| {
                    let mut state = w.take_customer(&id, now)?;
                    let op = if enter {
                        let joined = Membership {
                            since: now,
                            expires_at: None,
                        };
                        state.members.insert(name.clone(), joined);
                        Op::Add
                    } else {
                        state.members.remove(&name);
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
            let key = META_RULES.as_bytes();
            batch.wb.put_cf(engine.store.cf(CF_META), key, text.as_bytes());
            Ok((entered, exited))
        });
        match result {
            Ok(((entered, exited), _)) => {
                self.published.set_rules(self.rules.clone());
                self.order_pos = positions(&self.rules);
                Ok(SegmentUpdate::Immediate {
                    members: members.len(),
                    entered,
                    exited,
                })
            }
            Err(e) => {
                self.rules = old_rules;
                Err(e)
            }
        }
    }
}
