//! Loading a customer for a judgement (cache, store, or new), judging definitions at an
//! instant, and recording every net membership change.

use super::*;

impl Engine {
    /// Loads a customer (cache, then store, else new), bringing them up to the current rule
    /// set first if they were last evaluated under an older one.
    pub(super) fn take_customer(
        &mut self,
        customer: &Arc<str>,
        now: i64,
        batch: &mut Batch,
    ) -> Result<CustomerState, EngineError> {
        let state = match self.cache.remove(customer) {
            Some(s) => Some(s),
            None => self
                .store
                .load_customer_current(customer, self.current())?
                .map(|mut s| {
                    // The store leaves out what is past retention as of the last commit; the
                    // clock may have moved since. (Stored windows drop such events as they
                    // advance.)
                    let cutoff = now.saturating_sub(self.config.retention_ms);
                    s.history.events.retain(|e| e.ts > cutoff);
                    s
                }),
        };
        let mut state = match state {
            Some(s) => s,
            None => {
                let number = self.index.read().customers() + batch.new_ids.len() as u32;
                batch.new_ids.push((number, customer.clone()));
                batch
                    .wb
                    .put_cf(self.store.cf(CF_NUMBERS), number_key(number), customer.as_bytes());
                return Ok(CustomerState {
                    generation: self.generation,
                    number,
                    history_loaded: true,
                    ..Default::default()
                });
            }
        };
        if state.generation < self.generation {
            self.load_history(customer, &mut state, now, batch)?;
            self.upgrade(customer, &mut state, now, batch);
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
                .filter(|t| *t > fired && *t <= now && self.timers.contains(&(*t, customer.clone())))
            {
                self.fire_timer(customer, &mut state, due, batch)?;
                fired = due;
            }
        }
        self.windows_not_after(customer, &mut state, now, batch)?;
        Ok(state)
    }

    pub(super) fn put_back(&mut self, customer: Arc<str>, mut state: CustomerState, batch: &mut Batch) {
        state.last_used = self.batches;
        batch.dirty.insert(customer.clone());
        self.cache.insert(customer, state);
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
        batch: &mut Batch,
    ) {
        let rules = self.rules.clone();
        state.advance_windows(&rules, now, self.config.retention_ms);
        let mut desired: Vec<(Arc<str>, MemberKind, Option<Option<i64>>)> = Vec::new();
        let next_timer;
        {
            let facts = EngineFacts::new(&rules, state, now, self.config.retention_ms);
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
                    self.record_change(customer, state.number, kind, name, Op::Add, at, cause, batch);
                }
                (Some(_), None) => {
                    state.members.remove(&name);
                    self.record_change(customer, state.number, kind, name, Op::Remove, at, cause, batch);
                }
                (Some(m), Some(expires_at)) => m.expires_at = expires_at,
                (None, None) => {}
            }
        }
        self.schedule(customer, state, next_timer, batch);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn record_change(
        &mut self,
        customer: &Arc<str>,
        number: u32,
        kind: MemberKind,
        name: Arc<str>,
        op: Op,
        at: i64,
        cause: &Cause,
        batch: &mut Batch,
    ) {
        let seq = self.counters.next_seq;
        self.counters.next_seq += 1;
        let change = Change {
            seq,
            customer_id: customer.clone(),
            kind,
            name,
            op,
            at,
            cause: cause.clone(),
        };
        batch.wb.put_cf(
            self.store.cf(CF_CHANGES),
            seq.to_be_bytes(),
            change.encode_stored(number),
        );
        batch.wb.put_cf(
            self.store.cf(CF_CHANGES_BY_NAME),
            crate::store::change_name_key(&change.name, seq),
            [],
        );
        batch.changes.push(change);
        batch.numbers.push(number);
    }
}
