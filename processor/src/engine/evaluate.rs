//! Loading a customer for a judgement (cache, store, or new), judging definitions at an
//! instant, and recording every net membership change.

use super::*;

impl Worker<'_> {
    /// Loads a customer (cache, then store, else new), bringing them up to the current rule
    /// set first if they were last evaluated under an older one.
    pub(super) fn take_customer(
        &mut self,
        customer: &Arc<str>,
        now: i64,
    ) -> Result<Box<CustomerState>, EngineError> {
        let ctx = self.ctx;
        let state = match self.shard.cache.take(customer) {
            Some(s) => Some(s),
            None => ctx
                .store
                .load_customer_current(customer, ctx.current())?
                .map(|mut s| {
                    // The store leaves out what is past retention as of the last commit; the
                    // clock may have moved since. (Stored windows drop such events as they
                    // advance.)
                    let cutoff = now.saturating_sub(ctx.config.retention_ms);
                    s.history.events.retain(|e| e.ts > cutoff);
                    Box::new(s)
                }),
        };
        let mut state = match state {
            Some(s) => s,
            None => {
                // Numbered at the commit, in the order one thread would have met them.
                self.shard
                    .batch
                    .new_ids
                    .push((self.place.clone(), customer.clone()));
                return Ok(Box::new(CustomerState {
                    generation: ctx.generation,
                    number: crate::index::NO_NUMBER,
                    history_loaded: true,
                    ..Default::default()
                }));
            }
        };
        if state.generation != ctx.generation {
            self.load_history(customer, &mut state, now)?;
            self.upgrade(customer, &mut state, now);
        } else {
            // In wall clock mode the clock moves while a batch is built, so a customer's timer
            // can fall due before the tick fires it. It fires first: judging the customer at
            // `now` reschedules the timer, and the changes it stands for would be lost. A
            // timer may be early (an event judged only the definitions it can change and kept
            // the sooner timer), so firing it can schedule another one that is also due:
            // each fires in turn, each later than the one before.
            let mut fired = i64::MIN;
            while let Some(due) = state
                .timer
                .filter(|t| *t > fired && *t <= now && self.shard.timers.contains(&(*t, customer.clone())))
            {
                let timer = self.timer_place(due, customer);
                let place = std::mem::replace(&mut self.place, timer);
                let result = self.fire_timer(customer, &mut state, due);
                self.place = place;
                result?;
                fired = due;
            }
        }
        self.windows_not_after(customer, &mut state, now)?;
        Ok(state)
    }

    pub(super) fn put_back(&mut self, customer: Arc<str>, mut state: Box<CustomerState>) {
        state.last_used = self.ctx.batches;
        self.shard.batch.dirty.insert(customer.clone());
        self.shard.cache.insert(customer, state);
    }

    /// Evaluates the definitions in `scope` for one customer at `now`, records every net
    /// membership change `at` the given instant, and reschedules the customer's timer.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn evaluate(
        &mut self,
        customer: &Arc<str>,
        state: &mut CustomerState,
        now: i64,
        at: i64,
        scope: Scope,
        cause: &Cause,
    ) {
        let rules = self.ctx.rules;
        let retention_ms = self.ctx.config.retention_ms;
        state.advance_windows(rules, now, retention_ms);
        let mut desired: Vec<(Arc<str>, MemberKind, Option<Option<i64>>)> = Vec::new();
        let next_timer;
        {
            let facts = EngineFacts::new(rules, state, now, retention_ms);
            let mut judge = |id: DefId| {
                let def = rules.def(id);
                let kind = if def.kind == DefKind::Segment {
                    MemberKind::Segment
                } else {
                    MemberKind::Tag
                };
                let present = match def.kind {
                    DefKind::Trait => return,
                    DefKind::EventTag => {
                        let (present, until) = facts.event_tag(id);
                        present.then_some(until)
                    }
                    _ => facts.definition(id).is_true().then_some(None),
                };
                desired.push((def.name.clone(), kind, present));
            };
            match scope {
                Scope::Defs(ids) => ids.iter().copied().for_each(&mut judge),
                Scope::All => rules.evaluation_order().iter().copied().for_each(&mut judge),
            }
            let manual_expiry = state
                .manual
                .values()
                .filter_map(|m| m.expires_at)
                .filter(|e| *e > now)
                .min();
            next_timer = [rules.next_membership_change(&facts), manual_expiry]
                .into_iter()
                .flatten()
                .min();
        }
        // Manual tags on names the rules do not define.
        let manual: Vec<(Arc<str>, Option<Option<i64>>)> = state
            .manual
            .iter()
            .filter(|(name, _)| rules.lookup(name).is_none())
            .map(|(name, m)| {
                (
                    name.clone(),
                    m.expires_at.is_none_or(|e| now < e).then_some(m.expires_at),
                )
            })
            .collect();
        for (name, present) in manual {
            desired.push((name, MemberKind::Tag, present));
        }
        state.manual.retain(|_, m| m.expires_at.is_none_or(|e| now < e));
        // Memberships of names that are neither defined nor set by hand end (a manual tag
        // removed or expired, or a definition dropped by a rule change).
        let stale: Vec<Arc<str>> = state
            .members
            .keys()
            .filter(|n| rules.lookup(n).is_none() && !state.manual.contains_key(*n))
            .cloned()
            .collect();
        for name in stale {
            desired.push((name, MemberKind::Tag, None));
        }
        for (name, kind, present) in desired {
            match (state.members.get_mut(&name), present) {
                (None, Some(expires_at)) => {
                    state.members.insert(
                        name.clone(),
                        Membership {
                            since: at,
                            expires_at,
                        },
                    );
                    self.record_change(customer, kind, name, Op::Add, at, cause);
                }
                (Some(_), None) => {
                    state.members.remove(&name);
                    self.record_change(customer, kind, name, Op::Remove, at, cause);
                }
                (Some(m), Some(expires_at)) => m.expires_at = expires_at,
                (None, None) => {}
            }
        }
        self.schedule(customer, state, next_timer);
    }

    /// Records a net membership change; its `seq` is given at the commit.
    pub(super) fn record_change(
        &mut self,
        customer: &Arc<str>,
        kind: MemberKind,
        name: Arc<str>,
        op: Op,
        at: i64,
        cause: &Cause,
    ) {
        let batch = &mut self.shard.batch;
        batch.changes.push(Change {
            seq: 0,
            pseq: None,
            rules_version: None,
            customer_id: customer.clone(),
            kind,
            name,
            op,
            at,
            cause: cause.clone(),
        });
        batch.places.push(self.place.clone());
    }
}
