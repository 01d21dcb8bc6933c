//! Events in: validation against the clock, dedup by `event_id`, applying an event to its
//! customer (profile, event tags, windows) and judging what it can change, dead letters.
//! Requests are grouped: several callers' events go into one atomic commit.

use super::*;

impl Engine {
    /// Ingests raw events (one JSON object each) in order, and answers once they are
    /// durably applied. Bad events are rejected with a reason and kept as dead letters;
    /// nothing else of the batch is lost.
    pub fn ingest<B: AsRef<[u8]>>(&mut self, raw_events: &[B]) -> Result<IngestOutcome, EngineError> {
        self.ingest_from::<B, &str>(raw_events, &[])
    }

    /// Like [`Engine::ingest`], and records `positions` (where each source — a file, a Kafka
    /// partition — stands after these events) in the same atomic commit, so a restart
    /// resumes exactly after the last committed batch: no event lost, none counted twice.
    pub fn ingest_from<B: AsRef<[u8]>, S: AsRef<str>>(
        &mut self,
        raw_events: &[B],
        positions: &[(S, u64)],
    ) -> Result<IngestOutcome, EngineError> {
        let parsed = raw_events
            .iter()
            .map(|raw| parse_event(raw.as_ref(), &self.config.limits, i64::MAX))
            .collect();
        self.ingest_parsed(raw_events, parsed, positions)
    }

    /// Like [`Engine::ingest_from`] for events already parsed (on another thread) with
    /// [`parse_event`]: `parsed[i]` is the result for `raw_events[i]`. Parsing may skip the
    /// future-`ts` check (pass `i64::MAX`); it is made here against the engine's clock.
    pub fn ingest_parsed<B: AsRef<[u8]>, S: AsRef<str>>(
        &mut self,
        raw_events: &[B],
        parsed: Vec<Result<ValidEvent, Rejection>>,
        positions: &[(S, u64)],
    ) -> Result<IngestOutcome, EngineError> {
        let (mut outcome, changes) = self.transact(|engine, batch| {
            engine.fire_wall_timers(batch)?;
            engine.ingest_part(raw_events, parsed, positions, batch)
        })?;
        outcome.changes = changes;
        Ok(outcome)
    }

    /// Group commit: several callers' requests, in order, applied and committed as one
    /// atomic batch (one WAL write and fsync for all of them). Each gets its own outcome,
    /// with the changes its events caused (those of timers that fell due before the group,
    /// in wall clock mode, go with the first). If anything fails, nothing of the group is
    /// applied and every caller gets the error.
    pub fn ingest_group(&mut self, requests: Vec<IngestRequest>) -> Result<Vec<IngestOutcome>, EngineError> {
        let ((mut outcomes, starts), mut changes) = self.transact(|engine, batch| {
            engine.fire_wall_timers(batch)?;
            let mut outcomes = Vec::with_capacity(requests.len());
            // Where each request's changes begin; the first's include the timers before it.
            let mut starts = Vec::with_capacity(requests.len());
            for request in requests {
                starts.push(if outcomes.is_empty() {
                    0
                } else {
                    batch.changes.len()
                });
                outcomes.push(engine.ingest_part(&request.raw, request.parsed, &request.positions, batch)?);
            }
            Ok((outcomes, starts))
        })?;
        for (outcome, start) in outcomes.iter_mut().zip(starts).rev() {
            outcome.changes = changes.split_off(start);
        }
        Ok(outcomes)
    }

    /// In wall clock mode, fires the timers that fell due since the last tick first.
    fn fire_wall_timers(&mut self, batch: &mut Batch) -> Result<(), EngineError> {
        if self.config.clock == ClockMode::Wall {
            self.fire_timers(self.now(), batch)?;
        }
        Ok(())
    }

    /// One caller's events into the batch in flight, and where its sources stand after them.
    fn ingest_part<B: AsRef<[u8]>, S: AsRef<str>>(
        &mut self,
        raw_events: &[B],
        parsed: Vec<Result<ValidEvent, Rejection>>,
        positions: &[(S, u64)],
        batch: &mut Batch,
    ) -> Result<IngestOutcome, EngineError> {
        assert_eq!(raw_events.len(), parsed.len(), "one parse result per event");
        let mut outcome = IngestOutcome::default();
        let wall = wall_ms();
        for (index, (raw, parsed)) in raw_events.iter().zip(parsed).enumerate() {
            let latest = wall.max(self.counters.clock.unwrap_or(i64::MIN));
            let parsed = parsed.and_then(|ev| match ev.ts {
                Some(ts) => check_not_future(ts, &self.config.limits, latest).map(|()| ev),
                None => Ok(ev),
            });
            let result = match parsed {
                Ok(ev) => self.accept(ev, batch)?,
                Err(rejection) => Err(rejection),
            };
            match result {
                Ok(true) => outcome.accepted += 1,
                Ok(false) => outcome.duplicates += 1,
                Err(rejection) => {
                    self.dead_letter(batch, raw.as_ref(), &rejection, wall);
                    outcome.rejected += 1;
                    outcome.errors.push(IngestError {
                        index,
                        reason: rejection.to_string(),
                        code: rejection.code(),
                    });
                }
            }
        }
        for (source, offset) in positions {
            let key = format!("{META_OFFSET_PREFIX}{}", source.as_ref());
            self.store.put_meta_u64(&mut batch.wb, &key, *offset);
        }
        Ok(outcome)
    }

    /// Applies one valid event: `Ok(Ok(true))` when applied, `Ok(Ok(false))` for a
    /// duplicate, `Ok(Err(_))` when the event is rejected; `Err` fails the whole batch (the
    /// store failed), so no accepted event is ever turned into a dead letter by an I/O error.
    pub(super) fn accept(
        &mut self,
        mut ev: ValidEvent,
        batch: &mut Batch,
    ) -> Result<Result<bool, Rejection>, EngineError> {
        let ts = match (ev.ts, self.config.clock, self.counters.clock) {
            (Some(ts), _, _) => ts,
            (None, ClockMode::Event, Some(clock)) => clock,
            (None, ClockMode::Event, None) => return Ok(Err(Rejection::TsMissingClockUnknown)),
            (None, ClockMode::Wall, _) => self.now(),
        };
        if let Some(id) = &ev.event_id {
            if self.is_duplicate(id, batch)? {
                return Ok(Ok(false));
            }
        }
        if self.config.clock == ClockMode::Event && self.counters.clock.is_none_or(|c| ts > c) {
            self.fire_timers(ts, batch)?;
            self.counters.clock = Some(ts);
        }
        let now = self.now();
        let event_id = ev.event_id.take();
        self.apply_event(ev, event_id.as_deref(), ts, now, batch)?;
        if let Some(id) = event_id {
            let mut w = Writer::new();
            w.i64(now);
            batch.wb.put_cf(self.store.cf(CF_DEDUP), id.as_bytes(), w.buf);
            batch.dedup.insert(id, now);
        }
        Ok(Ok(true))
    }

    pub(super) fn is_duplicate(&self, event_id: &str, batch: &Batch) -> Result<bool, StoreError> {
        let now = self.now();
        let applied_at = match batch.dedup.get(event_id) {
            Some(t) => Some(*t),
            None => match self.store.get(CF_DEDUP, event_id.as_bytes())? {
                Some(b) => Some(Reader::new(&b).i64()?),
                None => None,
            },
        };
        Ok(applied_at.is_some_and(|t| now.saturating_sub(t) <= self.config.dedup_horizon_ms))
    }

    pub(super) fn apply_event(
        &mut self,
        ev: ValidEvent,
        event_id: Option<&str>,
        ts: i64,
        now: i64,
        batch: &mut Batch,
    ) -> Result<(), EngineError> {
        let customer = ev.customer_id.clone();
        let mut state = self.take_customer(&customer, now, batch)?;
        // A customer's first event establishes every membership, including those that hold
        // without any event (`not churn_risk`).
        let first_event = !state.has_events && state.members.is_empty() && state.history.profile.is_empty();
        let arrival = self.counters.next_arrival;
        self.counters.next_arrival += 1;
        let event = rules::Event {
            event_type: ev.event_type.clone(),
            ts,
            arrival,
            props: ev.props,
        };
        let rules = self.rules.clone();
        let changed_attrs: Vec<Arc<str>> = ev.profile.iter().map(|(k, _)| k.clone()).collect();
        let rejudged: Vec<DefId> = changed_attrs
            .iter()
            .flat_map(|attr| rules.affected_by_profile_attr(attr))
            .copied()
            .filter(|&id| rules.def(id).kind == DefKind::EventTag)
            .collect();
        let rebuild = WindowSet::reads_profile(&rules, &changed_attrs);
        if !changed_attrs.is_empty() {
            batch.profiles.push((state.number, customer.clone()));
        }
        if rebuild || !rejudged.is_empty() {
            // Past events are judged again with the new profile.
            self.load_history(&customer, &mut state, now, batch)?;
        }
        self.store.put_event(&mut batch.wb, &customer, &event, event_id);
        state.history.apply_profile(&event, ev.profile);
        for &id in rules.event_tags_for_type(&ev.event_type) {
            let spec = rules.def(id).event_tag.as_ref().expect("event tag");
            let matches =
                rules::filter_matches(spec.filter.as_ref(), &event, |n| state.history.profile_value(n));
            if matches {
                state
                    .event_tags
                    .entry(rules.def(id).name.clone())
                    .or_default()
                    .record(ts, now);
            }
        }
        if let Some(event) = state.push_event(&rules, event) {
            batch.events.push((customer.clone(), event));
        }
        if rebuild {
            state.window_rebuild(&rules, &changed_attrs);
        }
        for &id in &rejudged {
            self.rejudge_event_tag(id, &mut state, now);
        }
        let mut scope: Vec<DefId> = rules.affected_by_event_type(&ev.event_type).to_vec();
        for attr in &changed_attrs {
            scope.extend_from_slice(rules.affected_by_profile_attr(attr));
        }
        scope.sort_by_key(|&id| self.order_pos[id]);
        scope.dedup();
        let cause = Cause::Event(event_id.map(str::to_owned));
        let scope = if first_event {
            Scope::All
        } else {
            Scope::Defs(&scope)
        };
        self.evaluate(&customer, &mut state, now, ts.max(now), scope, &cause, batch);
        self.put_back(customer, state, batch);
        Ok(())
    }

    /// Judges an event tag's matches again over the retained history, with the current
    /// profile (its filter reads a profile attribute that just changed). Matches older than
    /// the retained history cannot be judged again and are kept.
    pub(super) fn rejudge_event_tag(&self, id: DefId, state: &mut CustomerState, now: i64) {
        let def = self.rules.def(id);
        let spec = def.event_tag.as_ref().expect("event tag");
        let mut tag = match_history(spec, state, now, self.config.retention_ms);
        let cutoff = now.saturating_sub(self.config.retention_ms);
        if let Some(old) = state
            .event_tags
            .get(&def.name)
            .and_then(|t| t.last_ts)
            .filter(|l| *l <= cutoff)
        {
            tag.last_ts = Some(tag.last_ts.map_or(old, |l| l.max(old)));
        }
        if tag.last_ts.is_some() || !tag.future.is_empty() {
            state.event_tags.insert(def.name.clone(), tag);
        } else {
            state.event_tags.remove(&def.name);
        }
    }

    /// Makes the customer's whole retained history resident: the committed events from the
    /// store and those of the batch in flight, older than the retention left out.
    pub(super) fn load_history(
        &self,
        customer: &str,
        state: &mut CustomerState,
        now: i64,
        batch: &Batch,
    ) -> Result<(), EngineError> {
        if state.history_loaded {
            return Ok(());
        }
        let cutoff = now.saturating_sub(self.config.retention_ms);
        let mut events: Vec<rules::Event> = self
            .store
            .customer_events(customer)?
            .into_iter()
            .map(|e| e.event)
            .filter(|e| e.ts > cutoff)
            .collect();
        events.extend(
            batch
                .events
                .iter()
                .filter(|(c, e)| **c == *customer && e.ts > cutoff)
                .map(|(_, e)| e.clone()),
        );
        state.history.events = events;
        state.history_loaded = true;
        Ok(())
    }

    pub(super) fn dead_letter(
        &mut self,
        batch: &mut Batch,
        raw: &[u8],
        rejection: &Rejection,
        received_at: i64,
    ) {
        let id = self.counters.next_dlq;
        self.counters.next_dlq += 1;
        let mut w = Writer::new();
        w.i64(received_at);
        w.str(&rejection.to_string());
        w.bytes(raw);
        // After the bytes, so dead letters written before codes existed still read.
        w.str(rejection.code());
        batch.wb.put_cf(self.store.cf(CF_DLQ), id.to_be_bytes(), w.buf);
    }
}
