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
        let parsed = self.intake().parse_batch(raw_events, "api");
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
        let with_ids = carry_ids(&parsed);
        let (mut outcomes, mut changes) = self.transact(|engine, batch| {
            let outcome = engine.ingest_round(with_ids, |engine, round| {
                engine.ingest_part(raw_events, parsed, positions, ("api", false), round, batch)
            })?;
            Ok(vec![outcome])
        })?;
        let mut outcome = outcomes.pop().expect("one outcome");
        outcome.changes = std::mem::take(&mut changes);
        Ok(outcome)
    }

    /// Group commit: several callers' requests, in order, applied and committed as one
    /// atomic batch (one WAL write and fsync for all of them). Each gets its own outcome,
    /// with the changes its events caused (those of timers that fell due before the group,
    /// in wall clock mode, go with the first). If anything fails, nothing of the group is
    /// applied and every caller gets the error.
    pub fn ingest_group(&mut self, requests: Vec<IngestRequest>) -> Result<Vec<IngestOutcome>, EngineError> {
        let ((mut outcomes, starts), changes, steps) =
            self.transact_placed(|engine, batch| engine.evaluate_group(requests, batch))?;
        pipeline::split_changes(&mut outcomes, &starts, changes, steps);
        Ok(outcomes)
    }

    /// Applies a group's requests in order into `batch` and the shards' batches; returns
    /// each request's outcome (without changes yet) and the step its events begin at.
    pub(super) fn evaluate_group(
        &mut self,
        requests: Vec<IngestRequest>,
        batch: &mut Batch,
    ) -> Result<(Vec<IngestOutcome>, Vec<u64>), EngineError> {
        let with_ids = requests.iter().any(|r| carry_ids(&r.parsed));
        self.ingest_round(with_ids, |engine, round| {
            let mut outcomes = Vec::with_capacity(requests.len());
            let mut starts = Vec::with_capacity(requests.len());
            for request in requests {
                starts.push(round.next_step);
                outcomes.push(engine.ingest_part(
                    &request.raw,
                    request.parsed,
                    &request.positions,
                    (request.source, request.owned_only),
                    round,
                    batch,
                )?);
            }
            Ok((outcomes, starts))
        })
    }

    /// One caller's events: validated, deduplicated and numbered in order here, each
    /// accepted one a job for the shard owning its customer; where its sources stand after
    /// them goes into the batch. `(source, owned_only)`: where they came from, and whether
    /// the events of parked partitions are handed back ([`IngestRequest::owned_only`]).
    fn ingest_part<B: AsRef<[u8]>, S: AsRef<str>>(
        &mut self,
        raw_events: &[B],
        parsed: Vec<Result<ValidEvent, Rejection>>,
        positions: &[(S, u64)],
        (source, owned_only): (&str, bool),
        round: &mut Round<'_>,
        batch: &mut Batch,
    ) -> Result<IngestOutcome, EngineError> {
        assert_eq!(raw_events.len(), parsed.len(), "one parse result per event");
        let mut outcome = IngestOutcome::default();
        let wall = wall_ms();
        let partition_clocks = self.config.partition_clocks();
        for (index, (raw, parsed)) in raw_events.iter().zip(parsed).enumerate() {
            let parsed = match parsed {
                Ok(event) if owned_only && self.parked_partition_named(&event) => {
                    outcome.moved.push(MovedEvent {
                        index,
                        raw: raw.as_ref().to_vec(),
                        event,
                    });
                    continue;
                }
                parsed => parsed,
            };
            let step = round.next_step;
            round.next_step += 1;
            // The partition whose clock judges the event: that of the customer it names (0,
            // the store's one clock, without a clock per partition).
            let partition = match (&parsed, partition_clocks) {
                (Ok(ev), true) => self.named_partition(ev).unwrap_or(0),
                _ => 0,
            };
            let parsed = parsed.and_then(|ev| match ev.ts {
                Some(ts) => {
                    let clock = self.counters.clock_of(partition);
                    check_not_future(ts, &self.config.limits, wall.max(clock.unwrap_or(i64::MIN)))
                        .and_then(|()| self.check_retention(&ev, ts, partition, raw.as_ref(), source))
                        .map(|()| ev)
                }
                None => Ok(ev),
            });
            let result = match parsed {
                Ok(ev) => self.accept(ev, raw.as_ref(), partition, step, round, batch)?,
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
        self.put_positions(batch, positions);
        Ok(outcome)
    }

    /// Records in `batch` where each source stands (`positions`: a file, a Kafka
    /// partition and its next offset), committed with what was read before it.
    /// Commits `positions` alone: the record read there was acted on before, or is left
    /// out (nothing to commit when there are none).
    pub(super) fn commit_positions<S: AsRef<str>>(
        &mut self,
        positions: &[(S, u64)],
    ) -> Result<(), EngineError> {
        if !positions.is_empty() {
            self.ingest_parsed::<&[u8], S>(&[], Vec::new(), positions)?;
        }
        Ok(())
    }

    /// Keeps `raw`, read at `positions`, as a dead letter for `rejection`, the positions
    /// committed with it: a record of the events topic that is not what it is marked as.
    pub(crate) fn dead_letter_at<S: AsRef<str>>(
        &mut self,
        raw: &[u8],
        rejection: Rejection,
        positions: &[(S, u64)],
    ) -> Result<IngestOutcome, EngineError> {
        self.ingest_parsed(&[raw], vec![Err(rejection)], positions)
    }

    /// A request read from a partition (`positions`) that `made` could not be made — its
    /// customers are no longer as it says, e.g. delivered twice — is left out, its
    /// position committed: `None`.
    pub(super) fn or_left_out<T, S: AsRef<str>>(
        &mut self,
        made: Result<T, EngineError>,
        positions: &[(S, u64)],
    ) -> Result<Option<T>, EngineError> {
        match made {
            Ok(made) => Ok(Some(made)),
            Err(EngineError::Conflict(_) | EngineError::NotFound(_)) => {
                self.commit_positions(positions)?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    pub(super) fn put_positions<S: AsRef<str>>(&self, batch: &mut Batch, positions: &[(S, u64)]) {
        for (source, offset) in positions {
            let key = format!("{META_OFFSET_PREFIX}{}", source.as_ref());
            self.store.put_meta_u64(&mut batch.wb, &key, *offset);
        }
    }

    /// Whether the customer `event` names is of a partition parked here (for an event a
    /// group's resolver is to resolve, whether partition 0 is).
    fn parked_partition_named(&self, event: &ValidEvent) -> bool {
        if self.parked.partitions.is_empty() {
            return false;
        }
        let partition = match self.config.resolver && event.resolved.is_none() && event.carries_ids() {
            true => Some(0),
            false => self.named_partition(event),
        };
        partition.is_some_and(|partition| self.parked.partitions.contains(&partition))
    }

    /// The partition of the customer `event` names ([`crate::kafka::route::named_customer`]:
    /// its `customer_id`, else the id its best-ranked identifier would mint) — where it is
    /// applied unless identity puts it with another customer; `None` when its identifiers
    /// name nobody (it is rejected).
    fn named_partition(&self, event: &ValidEvent) -> Option<u32> {
        if let Some(resolved) = &event.resolved {
            return Some(self.partition_of(&resolved.canonical));
        }
        if !event.customer_id.is_empty() {
            return Some(self.partition_of(&event.customer_id));
        }
        let identity = &self.config.identity;
        let prepared;
        let prepared = match &event.prepared {
            Some(prepared) => prepared,
            None => {
                prepared = identity.prepare(&event.ids, &event.customer_id).ok()?;
                &prepared
            }
        };
        let named = identity.named_customer(&event.customer_id, prepared)?;
        Some(self.partition_of(&named))
    }

    /// Decides what is global about one valid event — its instant, whether it is a
    /// duplicate, the clock, its arrival number — and hands it to its shard as a job:
    /// `Ok(Ok(true))` when accepted, `Ok(Ok(false))` for a duplicate, `Ok(Err(_))` when the
    /// event is rejected; `Err` fails the whole batch (the store failed), so no accepted
    /// event is ever turned into a dead letter by an I/O error.
    fn accept(
        &mut self,
        mut ev: ValidEvent,
        raw: &[u8],
        arrived_in: u32,
        step: u64,
        round: &mut Round<'_>,
        batch: &mut Batch,
    ) -> Result<Result<bool, Rejection>, EngineError> {
        let ts = match (ev.ts, self.config.clock, self.counters.clock_of(arrived_in)) {
            (Some(ts), _, _) => ts,
            (None, ClockMode::Event, Some(clock)) => clock,
            (None, ClockMode::Event, None) => return Ok(Err(Rejection::TsMissingClockUnknown)),
            (None, ClockMode::Wall, _) => self.now(),
        };
        // A forwarded event without an `event_id` is deduplicated by where it was first
        // read.
        if let Some(id) = ev.event_id.as_deref().or(ev.position_key.as_deref()) {
            if self.is_duplicate(id, self.now_in(arrived_in), batch)? {
                return Ok(Ok(false));
            }
        }
        let mut origin = None;
        // Whether identity put the event with another customer (of another partition, maybe).
        let mut rehomed = false;
        if let Some(resolved) = ev.resolved.take() {
            // Resolved by the group's resolver: applied to the customer it decided.
            ev.ids = Vec::new();
            ev.prepared = None;
            origin = resolved.origin;
            rehomed = resolved.canonical != ev.customer_id;
            ev.customer_id = resolved.canonical;
        } else if self.config.resolver && ev.carries_ids() {
            return self.resolve_for_group(ev, raw, batch);
        } else if ev.carries_ids() {
            // Prepared where the event was parsed, or here.
            let prepared = match ev.prepared.take() {
                Some(prepared) => prepared,
                None => match self.config.identity.prepare(&ev.ids, &ev.customer_id) {
                    Ok(prepared) => prepared,
                    Err(rejection) => return Ok(Err(rejection)),
                },
            };
            ev.ids = Vec::new();
            let resolution = match self.resolve(&ev.customer_id, prepared, batch)? {
                Ok(r) => r,
                Err(rejection) => return Ok(Err(rejection)),
            };
            let cause = Cause::Event(ev.event_id.clone());
            let arrival = self.counters.next_arrival;
            origin = self.settle_identity(&resolution, step, arrival, &cause, round, batch)?;
            rehomed = resolution.canonical != ev.customer_id;
            ev.customer_id = resolution.canonical;
        } else if !self.aliases.is_empty() {
            if let Some(survivor) = self.aliases.get(&ev.customer_id) {
                origin = Some(std::mem::replace(&mut ev.customer_id, survivor.clone()));
                rehomed = true;
            }
        }
        let partition_clocks = self.config.partition_clocks();
        let partition = match rehomed && partition_clocks {
            true => self.partition_of(&ev.customer_id),
            false => arrived_in,
        };
        if self.config.clock == ClockMode::Event && self.counters.advance(partition, ts) && !partition_clocks
        {
            // The shards fire the timers the clock passes here before this event. (With a
            // clock per partition, those of its own partition, before its event: placed
            // at its step.)
            round.steps.push((step, ts));
        }
        let now = self.now_in(partition);
        let event_id = ev.event_id.take();
        if let Some(id) = event_id.as_ref().or(ev.position_key.as_ref()) {
            let mut w = Writer::new();
            w.i64(now);
            batch.wb.put_cf(self.store.cf(CF_DEDUP), id.as_bytes(), w.buf);
            batch.dedup.insert(id.clone(), now);
            if self.config.changelog {
                let partition =
                    crate::partition::partition_of(ev.customer_id.as_bytes(), self.config.partitions);
                batch.dedup_partitions.insert(id.clone(), partition);
            }
        }
        let arrival = self.counters.next_arrival;
        self.counters.next_arrival += 1;
        let shard = self.shard_index(&ev.customer_id);
        // Since a customer absorbed another, its events keep the profile they set. In a
        // group resolving identity in one partition every event does: a store does not
        // know in time whether the customer an event is applied to holds another one's
        // events that an unmerge on its way will split off (its aliases are only the
        // customers handed over from here, which the unmerge's first step drops).
        let keep_profile =
            self.config.resolver || (!self.aliases.is_empty() && self.aliases.is_survivor(&ev.customer_id));
        round.deal(
            shard,
            Job {
                step,
                event: ev,
                event_id,
                ts,
                now,
                arrival,
                partition,
                origin,
                keep_profile,
            },
        )?;
        Ok(Ok(true))
    }

    /// An event at or before the clock minus the history retention cannot change a window
    /// (only an event tag without `ttl`): an `out_of_retention` violation, recorded, and a
    /// rejection if the plan blocks such events.
    fn check_retention(
        &self,
        ev: &ValidEvent,
        ts: i64,
        partition: u32,
        raw: &[u8],
        source: &str,
    ) -> Result<(), Rejection> {
        let floor = self.now_in(partition).saturating_sub(self.config.retention_ms);
        if ts > floor || self.counters.clock_of(partition).is_none() && self.config.clock == ClockMode::Event
        {
            return Ok(());
        }
        let violation = Violation {
            class: ViolationClass::OutOfRetention,
            field: Some("ts".to_owned()),
            detail: format!(
                "ts {ts} is at or before the retention floor {floor} (history retention {}): it changes no window",
                rules::ast::format_duration(self.config.retention_ms)
            ),
        };
        let block = self
            .plan
            .as_ref()
            .is_some_and(|p| p.out_of_retention == rules::Mode::Block);
        let sighting = Sighting {
            event_type: ev.event_type.to_string(),
            violations: vec![violation.clone()],
            blocked: block.then_some(ViolationClass::OutOfRetention),
            line: crate::quality::sample_line(raw),
        };
        self.quality
            .record(source, wall_ms(), vec![sighting], self.plan.as_deref());
        if block {
            return Err(Rejection::Plan(violation));
        }
        Ok(())
    }

    /// Whether `event_id` was first applied at most the dedup horizon before `now`.
    pub(super) fn is_duplicate(&self, event_id: &str, now: i64, batch: &Batch) -> Result<bool, StoreError> {
        // This batch's, then those of a commit being written, then the store's.
        let in_flight = || {
            self.pending
                .as_ref()
                .and_then(|p| p.done.dedup.get(event_id))
                .copied()
        };
        let applied_at = match batch.dedup.get(event_id).copied().or_else(in_flight) {
            Some(t) => Some(t),
            None => match self.store.get(CF_DEDUP, event_id.as_bytes())? {
                Some(b) => Some(Reader::new(&b).i64()?),
                None => None,
            },
        };
        Ok(applied_at.is_some_and(|t| now.saturating_sub(t) <= self.config.dedup_horizon_ms))
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

/// A customer's stored events as read (before or after the write of a commit) completed
/// with the events that commit writes: each once, in `ts` then arrival order, as the store
/// lists them.
fn with_written(
    mut read: Vec<StoredEvent>,
    written: &super::Written,
    kept: &[super::Kept],
) -> Result<Vec<StoredEvent>, StoreError> {
    let there: HashSet<u64> = read.iter().map(|e| e.event.arrival).collect();
    for kept in kept.iter().filter(|k| !there.contains(&k.arrival)) {
        read.push(written.decode(kept)?);
    }
    read.sort_by_key(|e| (e.event.ts, e.event.arrival));
    Ok(read)
}

/// True when some of `parsed` carry identifiers: a merge may absorb, later in the round, a
/// customer whose events were applied already.
fn carry_ids(parsed: &[Result<ValidEvent, Rejection>]) -> bool {
    parsed
        .iter()
        .any(|p| p.as_ref().is_ok_and(ValidEvent::carries_ids))
}

impl Worker<'_> {
    /// Applies one accepted event to its customer (profile, event tags, windows) and judges
    /// what it can change.
    pub(super) fn apply_event(
        &mut self,
        ev: ValidEvent,
        event_id: Option<&str>,
        ts: i64,
        now: i64,
        arrival: u64,
        (origin, keep_profile): (Option<&str>, bool),
    ) -> Result<(), EngineError> {
        let customer = ev.customer_id.clone();
        let mut state = self.take_customer(&customer, now)?;
        // A customer's first event establishes every membership, including those that hold
        // without any event (`not churn_risk`).
        let first_event = !state.has_events && state.members.is_empty() && state.history.profile.is_empty();
        let event = rules::Event {
            event_type: ev.event_type.clone(),
            ts,
            arrival,
            props: ev.props,
        };
        let ctx = self.ctx;
        let rules = ctx.rules;
        let changed_attrs: Vec<Arc<str>> = ev.profile.iter().map(|(k, _)| k.clone()).collect();
        let rejudged: Vec<DefId> = changed_attrs
            .iter()
            .flat_map(|attr| rules.affected_by_profile_attr(attr))
            .copied()
            .filter(|&id| rules.def(id).kind == DefKind::EventTag)
            .collect();
        let rebuild = WindowSet::reads_profile(rules, &changed_attrs);
        if !changed_attrs.is_empty() {
            self.shard.batch.profiles.push(customer.clone());
        }
        if rebuild || !rejudged.is_empty() {
            // Past events are judged again with the new profile.
            self.load_history(&customer, &mut state, now)?;
        }
        ctx.store.put_event(
            &mut self.shard.batch.wb,
            &customer,
            &event,
            event_id,
            origin,
            if keep_profile { &ev.profile } else { &[] },
        );
        self.shard.batch.keep_written(&customer, event.ts, event.arrival);
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
        if let Some(event) = state.push_event(rules, event) {
            match self.shard.batch.events.get_mut(&customer) {
                Some(events) => events.push(event),
                None => {
                    self.shard.batch.events.insert(customer.clone(), vec![event]);
                }
            }
        }
        if rebuild {
            state.window_rebuild(rules, &changed_attrs);
        }
        for &id in &rejudged {
            self.rejudge_event_tag(id, &mut state, now);
        }
        let mut scope: Vec<DefId> = rules.affected_by_event_type(&ev.event_type).to_vec();
        for attr in &changed_attrs {
            scope.extend_from_slice(rules.affected_by_profile_attr(attr));
        }
        scope.sort_by_key(|&id| ctx.order_pos[id]);
        scope.dedup();
        let cause = Cause::Event(event_id.map(str::to_owned));
        let scope = if first_event {
            Scope::All
        } else {
            Scope::Defs(&scope)
        };
        self.evaluate(&customer, &mut state, now, ts.max(now), scope, &cause);
        self.put_back(customer, state);
        Ok(())
    }

    /// Judges an event tag's matches again over the retained history, with the current
    /// profile (its filter reads a profile attribute that just changed). Matches older than
    /// the retained history cannot be judged again and are kept.
    pub(super) fn rejudge_event_tag(&self, id: DefId, state: &mut CustomerState, now: i64) {
        let def = self.ctx.rules.def(id);
        let spec = def.event_tag.as_ref().expect("event tag");
        let retention_ms = self.ctx.config.retention_ms;
        let mut tag = match_history(spec, state, now, retention_ms);
        let cutoff = now.saturating_sub(retention_ms);
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
    ) -> Result<(), EngineError> {
        if state.history_loaded {
            return Ok(());
        }
        let committed = self.committed_events(customer)?;
        self.install_history(customer, state, now, committed.into_iter().map(|e| e.event));
        Ok(())
    }

    /// The committed events of `customer`, by arrival (those of this round are not in the
    /// store yet).
    pub(super) fn committed_events(
        &self,
        customer: &str,
    ) -> Result<Vec<crate::store::StoredEvent>, EngineError> {
        if let Some(write) = self.ctx.pending {
            // The customer's events of the commit being written must be in the store first
            // (if that write fails, this round is rolled back anyway). A customer that commit
            // does not write has all its events in the store already: no wait. RocksDB makes
            // a batch visible whole, so a read sees the store before or after that write;
            // where the commit kept the events it writes, they complete the read instead.
            let written_there = self
                .ctx
                .pending_dirty
                .is_none_or(|dirty| dirty.iter().any(|shard| shard.contains(customer)));
            if written_there {
                match self.ctx.pending_written {
                    Some(shards) => {
                        let theirs = shards
                            .iter()
                            .find_map(|shard| shard.get(customer).map(|kept| (shard, kept)));
                        return match theirs {
                            Some((_, None)) => Ok(Vec::new()),
                            Some((shard, Some(kept))) => {
                                let read = self.ctx.store.customer_events(customer)?;
                                Ok(with_written(read, shard, kept)?)
                            }
                            None => Ok(self.ctx.store.customer_events(customer)?),
                        };
                    }
                    None => {
                        let _ = write.wait();
                    }
                }
            }
        }
        Ok(self.ctx.store.customer_events(customer)?)
    }

    /// Makes `committed` (the customer's events in the store) and those of this round its
    /// loaded history, as far as the retention reaches.
    pub(super) fn install_history(
        &self,
        customer: &str,
        state: &mut CustomerState,
        now: i64,
        committed: impl Iterator<Item = rules::Event>,
    ) {
        let cutoff = now.saturating_sub(self.ctx.config.retention_ms);
        let mut events: Vec<rules::Event> = committed.filter(|e| e.ts > cutoff).collect();
        if let Some(theirs) = self.shard.batch.events.get(customer) {
            events.extend(theirs.iter().filter(|e| e.ts > cutoff).cloned());
        }
        state.history.events = events;
        state.history_loaded = true;
    }
}

/// A round's events: where the clock moved, the next step, and where the events go — the
/// shards' queues ([`super::deal`]: events that carry identifiers, whose merges the shards
/// make in their order), or each shard's jobs, applied once every event is decided
/// ([`Engine::collected_round`]: events without, where no merge can happen and dealing costs
/// more than it overlaps). A round with neither (a merge by hand) runs its work here.
pub(super) struct Round<'s> {
    pub(super) steps: Vec<(u64, i64)>,
    next_step: u64,
    pub(super) dealer: Option<Dealer<'s>>,
    jobs: Vec<Vec<Job>>,
}

impl<'s> Round<'s> {
    pub(super) fn dealt(dealer: Dealer<'s>) -> Round<'s> {
        Round {
            dealer: Some(dealer),
            ..Round::by_hand()
        }
    }

    /// A round of work done on this thread, one customer at a time (no events).
    pub(super) fn by_hand() -> Round<'s> {
        Round {
            steps: Vec::new(),
            next_step: 0,
            dealer: None,
            jobs: Vec::new(),
        }
    }

    /// Hands `job` to `shard`: to its queue, or to its jobs.
    fn deal(&mut self, shard: usize, job: Job) -> Result<(), EngineError> {
        match &mut self.dealer {
            Some(dealer) => dealer.deal(shard, job, &self.steps),
            None => {
                assert!(!self.jobs.is_empty(), "events go only to a round that takes them");
                self.jobs[shard].push(job);
                Ok(())
            }
        }
    }
}

impl Engine {
    /// Runs `decide` with a round that collects each shard's jobs, then the shards on them
    /// in parallel (and the timers due by the round's end).
    pub(super) fn collected_round<R>(
        &mut self,
        decide: impl FnOnce(&mut Engine, &mut Round<'_>) -> Result<R, EngineError>,
    ) -> Result<R, EngineError> {
        let mut round = Round::by_hand();
        round.jobs = (0..self.shards.len()).map(|_| Vec::new()).collect();
        let result = decide(self, &mut round)?;
        let (until, timers) = (self.round_until(), self.config.timers_beside_events);
        self.run_round(round.jobs, &round.steps, until, timers)?;
        Ok(result)
    }

    /// The instant an ingest round's timers are fired up to at its end: the wall clock
    /// now, or the event clock where the round's events moved it.
    pub(super) fn round_until(&self) -> Option<i64> {
        match self.config.clock {
            ClockMode::Wall => Some(self.now()),
            // Each partition's timers fire before its events as its clock passes them.
            ClockMode::Event if self.config.partition_clocks() => None,
            ClockMode::Event => self.counters.clock,
        }
    }

    /// A round whose events carry identifiers (`with_ids`) is dealt; any other is collected.
    pub(super) fn ingest_round<R>(
        &mut self,
        with_ids: bool,
        work: impl FnOnce(&mut Engine, &mut Round<'_>) -> Result<R, EngineError>,
    ) -> Result<R, EngineError> {
        if with_ids {
            self.dealt_round(work)
        } else {
            self.collected_round(work)
        }
    }
}
