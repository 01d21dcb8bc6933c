//! Identity resolution in the engine ([`crate::identity`] has the graph's layout and the
//! normalisers). Resolution runs on the engine thread before an event is dealt to its
//! shard, so the shards only ever see canonical customer ids. A merge cuts the round at
//! the event that causes it: the events before it are applied first, then the absorbed
//! customers hand their retained history, profile and manual tags to the survivor, who is
//! rebuilt from the union as if every event had always carried one id — all in the batch of
//! the round, so a crash leaves either no merge or all of it.

use super::*;

use super::ingest::Round;
use crate::identity::{owner_key, parse_owner_key, record_key, IdRecord, CUSTOMER_ID};
use crate::store::CF_IDENTITIES;

/// Where an event's identifiers lead.
pub(super) struct Resolution {
    /// The customer the event is applied to.
    pub canonical: Arc<str>,
    /// Customers the event shows to be the same person as `canonical`, merged into it first.
    pub absorbed: Vec<Arc<str>>,
    /// The event's identifiers no customer owns yet, attached to `canonical` within limits.
    pub attach: Vec<(Arc<str>, String)>,
    /// True when no identifier of the event was known: `canonical` is a new customer named
    /// after its best identifier (`phone:13800000001`).
    pub minted: bool,
}

/// A merge made by hand: the survivor, the customers it absorbed, the changes.
#[derive(Debug)]
pub struct Merged {
    pub survivor: Arc<str>,
    pub absorbed: Vec<Arc<str>>,
    pub changes: Vec<Change>,
}

/// What an absorbed customer hands to the survivor.
pub(super) struct Handover {
    events: Vec<(rules::Event, Option<String>)>,
    profile: BTreeMap<Arc<str>, rules::ProfileEntry>,
    manual: BTreeMap<Arc<str>, ManualTag>,
    /// Event tag matches older than the retained history (kept, as a rebuild cannot find
    /// them again).
    old_matches: Vec<(Arc<str>, i64)>,
}

/// Every absorbed `customer_id` and the customer it resolves to.
pub(super) fn load_aliases(store: &Store) -> Result<HashMap<Arc<str>, Arc<str>>, StoreError> {
    let prefix = owner_key(CUSTOMER_ID, "");
    let mut aliases = HashMap::new();
    for (key, value) in store.scan_prefix(CF_IDENTITIES, &prefix)? {
        if let Some((_, id)) = parse_owner_key(&key) {
            aliases.insert(Arc::from(id), Arc::from(String::from_utf8_lossy(&value).as_ref()));
        }
    }
    Ok(aliases)
}

impl Engine {
    /// The customer an id names: itself, or the survivor of the merge that absorbed it.
    pub fn canonical_id(&self, customer_id: &str) -> Arc<str> {
        self.aliases
            .get(customer_id)
            .cloned()
            .unwrap_or_else(|| Arc::from(customer_id))
    }

    /// The canonical customer an identifier of type `id_type` belongs to (its value
    /// normalised as events' are), if any event brought it; a `customer_id` answers its
    /// survivor if a merge absorbed it, else itself.
    pub fn identify(&self, id_type: &str, value: &str) -> Result<Option<Arc<str>>, EngineError> {
        let pending = self.pending.as_ref().map(|p| &p.done.identities);
        lookup(&self.store, &self.config.identity, pending, id_type, value)
    }

    /// Merges `others` into `survivor` by hand (the "merge duplicate customers" permission):
    /// like a merge an event causes, the survivor rebuilt over the union of the histories, the
    /// change log recording it with `by` (the API key's name) as the cause. Identifier
    /// limits do not apply: a person judged this. Returns the absorbed customers (as their
    /// canonical ids) and the changes.
    pub fn merge_customers(
        &mut self,
        survivor: &str,
        others: &[String],
        by: Option<&str>,
    ) -> Result<Merged, EngineError> {
        self.settle();
        let survivor = self.existing_customer(survivor)?;
        let mut absorbed: Vec<Arc<str>> = Vec::new();
        for other in others {
            let other = self.existing_customer(other)?;
            if other == survivor {
                return Err(EngineError::Conflict(format!(
                    "`{other}` is already customer `{survivor}`"
                )));
            }
            if !absorbed.contains(&other) {
                absorbed.push(other);
            }
        }
        if absorbed.is_empty() {
            return Err(EngineError::Conflict(
                "name at least one customer to merge in `ids`".into(),
            ));
        }
        let cause = by.map_or(Cause::Manual, |k| Cause::ManualBy(k.to_owned()));
        let resolution = Resolution {
            canonical: survivor.clone(),
            absorbed: absorbed.clone(),
            attach: Vec::new(),
            minted: false,
        };
        let ((), changes) = self.transact(|engine, batch| {
            let mut round = Round::new(engine.shards.len());
            let arrival = engine.counters.next_arrival;
            engine.settle_identity(&resolution, 0, arrival, &cause, &mut round, batch)
        })?;
        Ok(Merged {
            survivor,
            absorbed,
            changes,
        })
    }

    /// The canonical id of a customer the store holds (an absorbed id names its survivor).
    fn existing_customer(&self, id: &str) -> Result<Arc<str>, EngineError> {
        let id = self.canonical_id(&rules::normalize(id));
        if id.is_empty() || self.read_customer(&id)?.is_none() {
            return Err(EngineError::NotFound(format!("no customer `{id}`")));
        }
        Ok(id)
    }

    /// Every identifier `customer` owns, as (type, normalised value).
    pub fn identifiers(&self, customer: &str) -> Result<Vec<(Arc<str>, String)>, EngineError> {
        Ok(self.id_record(customer, &Batch::default())?.ids)
    }

    /// A graph entry: this batch's, then a commit being written's, then the store's.
    fn identity_get(&self, key: &[u8], batch: &Batch) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = batch.identities.get(key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.pending.as_ref().and_then(|p| p.done.identities.get(key)) {
            return Ok(v.clone());
        }
        self.store.get(CF_IDENTITIES, key)
    }

    fn identity_put(&self, batch: &mut Batch, key: Vec<u8>, value: Option<Vec<u8>>) {
        let cf = self.store.cf(CF_IDENTITIES);
        match &value {
            Some(v) => batch.wb.put_cf(cf, &key, v),
            None => batch.wb.delete_cf(cf, &key),
        }
        batch.identities.insert(key, value);
    }

    /// A canonical customer's record; a customer only ever named by its `customer_id` has
    /// none and owns just that.
    fn id_record(&self, customer: &str, batch: &Batch) -> Result<IdRecord, StoreError> {
        Ok(match self.identity_get(&record_key(customer), batch)? {
            Some(bytes) => IdRecord::decode(&bytes)?,
            None => IdRecord {
                created: 0,
                ids: vec![(Arc::from(CUSTOMER_ID), customer.to_owned())],
            },
        })
    }

    /// Where `ev`'s identifiers lead (its `customer_id` one of them), or why it is rejected.
    pub(super) fn resolve(
        &self,
        ev: &ValidEvent,
        batch: &Batch,
    ) -> Result<Result<Resolution, Rejection>, StoreError> {
        let config = &self.config.identity;
        let customer_id_type = config
            .position(CUSTOMER_ID)
            .expect("customer_id is always a type");
        let mut ids: Vec<(usize, String)> = Vec::with_capacity(ev.ids.len() + 1);
        for (id_type, raw) in &ev.ids {
            let Some(i) = config.position(id_type) else {
                return Ok(Err(Rejection::IdTypeUnknown {
                    id_type: id_type.to_string(),
                    known: config.names(),
                }));
            };
            match config.types[i].normaliser.apply(raw) {
                Some(value) => ids.push((i, value)),
                None => self.identity_counts.unusable(&config.types[i].name),
            }
        }
        if !ev.customer_id.is_empty() {
            ids.push((customer_id_type, ev.customer_id.to_string()));
        }
        if ids.is_empty() {
            return Ok(Err(Rejection::IdsUnusable));
        }
        // Best-ranked first; one of each.
        ids.sort_by(|a, b| {
            config.types[b.0]
                .rank
                .cmp(&config.types[a.0].rank)
                .then_with(|| a.cmp(b))
        });
        ids.dedup();
        let mut owners: Vec<Arc<str>> = Vec::new();
        let mut attach = Vec::new();
        for (i, value) in &ids {
            let name = &config.types[*i].name;
            let owner = if *i == customer_id_type {
                Some(self.canonical_id(value))
            } else {
                self.identity_get(&owner_key(name, value), batch)?
                    .map(|b| Arc::<str>::from(String::from_utf8_lossy(&b).as_ref()))
            };
            match owner {
                Some(owner) if !owners.contains(&owner) => owners.push(owner),
                Some(_) => {}
                None => attach.push((name.clone(), value.clone())),
            }
        }
        let minted = owners.is_empty();
        let (canonical, absorbed) = match owners.len() {
            0 => {
                let (i, value) = &ids[0];
                (
                    Arc::from(format!("{}:{value}", config.types[*i].name)),
                    Vec::new(),
                )
            }
            1 => (owners.remove(0), Vec::new()),
            _ => {
                let records = owners
                    .iter()
                    .map(|o| self.id_record(o, batch))
                    .collect::<Result<Vec<_>, _>>()?;
                let broken: Vec<&Arc<str>> = config
                    .types
                    .iter()
                    .filter(|t| {
                        t.max_per_customer
                            .is_some_and(|max| records.iter().map(|r| r.count(&t.name)).sum::<usize>() > max)
                    })
                    .map(|t| &t.name)
                    .collect();
                if broken.is_empty() {
                    let survivor = (0..owners.len())
                        .max_by(|&a, &b| {
                            let key = |i: usize| {
                                (
                                    records[i].best_rank(config),
                                    std::cmp::Reverse(records[i].created),
                                )
                            };
                            key(a).cmp(&key(b)).then_with(|| owners[b].cmp(&owners[a]))
                        })
                        .expect("two or more owners");
                    let canonical = owners.remove(survivor);
                    (canonical, owners)
                } else {
                    // Not the same person by the limits' judgement (a shared device): the
                    // event goes to the owner of its best identifier, nobody is merged.
                    for name in broken {
                        self.identity_counts.limit_hit(name);
                    }
                    (owners.remove(0), Vec::new())
                }
            }
        };
        Ok(Ok(Resolution {
            canonical,
            absorbed,
            attach,
            minted,
        }))
    }

    /// Applies a resolution before its event (at `step`, arrival `arrival`) is dealt: the
    /// round so far is run, the merge made, the new identifiers attached.
    pub(super) fn settle_identity(
        &mut self,
        resolution: &Resolution,
        step: u64,
        arrival: u64,
        cause: &Cause,
        round: &mut Round,
        batch: &mut Batch,
    ) -> Result<(), EngineError> {
        let canonical = &resolution.canonical;
        let mut record = match self.identity_get(&record_key(canonical), batch)? {
            Some(bytes) => Some(IdRecord::decode(&bytes).map_err(StoreError::from)?),
            None => None,
        };
        let mut changed = false;
        if !resolution.absorbed.is_empty() {
            // The events before this one are applied to the customers they named.
            let before = std::mem::replace(round, round.continuing());
            self.run_ingest_round(before)?;
            let mut survivor = match record.take() {
                Some(r) => r,
                None => self.id_record(canonical, batch)?,
            };
            for absorbed in &resolution.absorbed {
                let mut theirs = self.id_record(absorbed, batch)?;
                if !theirs.owns(CUSTOMER_ID, absorbed) {
                    // A customer made for an event without `customer_id` is named after its
                    // best identifier: that name resolves to the survivor too.
                    theirs.ids.push((Arc::from(CUSTOMER_ID), absorbed.to_string()));
                }
                for (id_type, value) in &theirs.ids {
                    self.identity_put(
                        batch,
                        owner_key(id_type, value),
                        Some(canonical.as_bytes().to_vec()),
                    );
                    if &**id_type == CUSTOMER_ID {
                        self.aliases.insert(Arc::from(value.as_str()), canonical.clone());
                    }
                }
                survivor.ids.append(&mut theirs.ids);
                self.identity_put(batch, record_key(absorbed), None);
            }
            record = Some(survivor);
            changed = true;
            self.merge(canonical, &resolution.absorbed, step, cause)?;
            self.identity_counts.merged(resolution.absorbed.len());
        }
        let limits = &self.config.identity;
        for (id_type, value) in &resolution.attach {
            let record = record.get_or_insert_with(|| IdRecord {
                created: arrival,
                ids: if resolution.minted {
                    Vec::new()
                } else {
                    vec![(Arc::from(CUSTOMER_ID), canonical.to_string())]
                },
            });
            let max = limits
                .position(id_type)
                .and_then(|i| limits.types[i].max_per_customer);
            if max.is_some_and(|max| record.count(id_type) >= max) {
                self.identity_counts.limit_hit(id_type);
                continue;
            }
            record.ids.push((id_type.clone(), value.clone()));
            self.identity_put(
                batch,
                owner_key(id_type, value),
                Some(canonical.as_bytes().to_vec()),
            );
            self.identity_counts.attached(id_type);
            changed = true;
        }
        if changed {
            if let Some(record) = &record {
                self.identity_put(batch, record_key(canonical), Some(record.encode()));
            }
        }
        Ok(())
    }

    /// Moves each absorbed customer's retained history, profile and manual tags to
    /// `survivor` and rebuilds the survivor from the union; the absorbed leave every tag and
    /// segment and are deleted.
    fn merge(
        &mut self,
        survivor: &Arc<str>,
        absorbed: &[Arc<str>],
        step: u64,
        cause: &Cause,
    ) -> Result<(), EngineError> {
        let now = self.now();
        let mut handovers = Vec::with_capacity(absorbed.len());
        for (part, customer) in absorbed.iter().enumerate() {
            let handover = self.with_worker_at(customer, Place::merge(step, part), |w| {
                w.leave(customer, survivor, now, cause)
            })?;
            handovers.push(handover);
        }
        let place = Place::merge(step, absorbed.len());
        self.with_worker_at(survivor, place, |w| w.absorb(survivor, handovers, now, cause))
    }
}

impl ReadHandle {
    /// [`Engine::identify`] as of the last commit.
    pub fn identify(&self, id_type: &str, value: &str) -> Result<Option<Arc<str>>, EngineError> {
        lookup(&self.store, &self.identity, None, id_type, value)
    }

    /// The identifiers a canonical customer owns, as of the last commit (none for a customer
    /// that does not exist).
    pub fn identifiers(&self, customer: &str) -> Result<Vec<(Arc<str>, String)>, EngineError> {
        Ok(match self.store.get(CF_IDENTITIES, &record_key(customer))? {
            Some(bytes) => IdRecord::decode(&bytes).map_err(StoreError::from)?.ids,
            None => vec![(Arc::from(CUSTOMER_ID), customer.to_owned())],
        })
    }

    /// What identity resolution has done (`GET /v1/identities/stats`), with the aliases the
    /// graph keeps.
    pub fn identity_stats(&self) -> crate::identity::IdentityStats {
        self.identity_counts.snapshot()
    }
}

/// An identifier's canonical customer: `pending` (a commit being written), then the store.
fn lookup(
    store: &Store,
    config: &crate::identity::IdentityConfig,
    pending: Option<&foldhash::HashMap<Vec<u8>, Option<Vec<u8>>>>,
    id_type: &str,
    value: &str,
) -> Result<Option<Arc<str>>, EngineError> {
    let Some(i) = config.position(id_type) else {
        return Err(EngineError::NotFound(format!(
            "unknown identifier type `{id_type}` (known: {})",
            config.names()
        )));
    };
    let Some(normal) = config.types[i].normaliser.apply(value) else {
        return Err(EngineError::Conflict(format!(
            "`{value}` is not a usable {id_type}: it normalises to nothing"
        )));
    };
    let key = owner_key(id_type, &normal);
    let owner = match pending.and_then(|p| p.get(&key)) {
        Some(v) => v.clone(),
        None => store.get(CF_IDENTITIES, &key)?,
    };
    Ok(match owner {
        Some(b) => Some(Arc::from(String::from_utf8_lossy(&b).as_ref())),
        // A customer_id nobody absorbed names itself.
        None if id_type == CUSTOMER_ID => Some(Arc::from(normal)),
        None => None,
    })
}

impl Worker<'_> {
    /// The change log records the merge; the absorbed customer leaves every tag and segment
    /// and is deleted. Returns what the survivor takes over.
    fn leave(
        &mut self,
        customer: &Arc<str>,
        survivor: &Arc<str>,
        now: i64,
        cause: &Cause,
    ) -> Result<Handover, EngineError> {
        self.record_change(
            survivor,
            MemberKind::Customer,
            customer.clone(),
            Op::Merge,
            now,
            cause,
        );
        let mut state = self.take_customer(customer, now)?;
        self.load_history(customer, &mut state, now)?;
        let rules = self.ctx.rules;
        for name in std::mem::take(&mut state.members).into_keys() {
            let kind = match rules.lookup(&name).map(|id| rules.def(id).kind) {
                Some(DefKind::Segment) => MemberKind::Segment,
                _ => MemberKind::Tag,
            };
            self.record_change(customer, kind, name, Op::Remove, now, cause);
        }
        self.schedule(customer, &mut state, None);
        let store = self.ctx.store;
        store.forget_customer(&mut self.shard.batch.wb, customer, &state);
        // The event ids the store keeps with committed events (those of this round's events
        // are not kept across the move).
        let event_ids: HashMap<u64, String> = store
            .customer_events(customer)?
            .into_iter()
            .filter_map(|e| e.event_id.map(|id| (e.event.arrival, id)))
            .collect();
        let batch = &mut self.shard.batch;
        batch.events.retain(|(c, _)| c != customer);
        batch.dirty.remove(customer);
        batch.gone.insert(customer.clone(), state.number);
        if state.number != crate::index::NO_NUMBER && !state.history.profile.is_empty() {
            batch
                .cleared
                .push((state.number, state.history.profile.keys().cloned().collect()));
        }
        let cutoff = now.saturating_sub(self.ctx.config.retention_ms);
        Ok(Handover {
            events: std::mem::take(&mut state.history.events)
                .into_iter()
                .map(|e| {
                    let id = event_ids.get(&e.arrival).cloned();
                    (e, id)
                })
                .collect(),
            profile: std::mem::take(&mut state.history.profile),
            manual: std::mem::take(&mut state.manual),
            old_matches: state
                .event_tags
                .iter()
                .filter_map(|(name, tag)| tag.last_ts.filter(|t| *t <= cutoff).map(|t| (name.clone(), t)))
                .collect(),
        })
    }

    /// The survivor takes over the absorbed customers' events, profile (the newest value of
    /// each attribute by `ts`, then arrival), manual tags, and is judged again over the union
    /// of the histories.
    fn absorb(
        &mut self,
        customer: &Arc<str>,
        handovers: Vec<Handover>,
        now: i64,
        cause: &Cause,
    ) -> Result<(), EngineError> {
        let mut state = self.take_customer(customer, now)?;
        self.load_history(customer, &mut state, now)?;
        let store = self.ctx.store;
        let rules = self.ctx.rules;
        let mut old_matches: Vec<(Arc<str>, i64)> = Vec::new();
        let mut profile_changed = false;
        for handover in handovers {
            for (event, event_id) in handover.events {
                store.put_event(&mut self.shard.batch.wb, customer, &event, event_id.as_deref());
                state.history.events.push(event);
                state.has_events = true;
            }
            for (name, entry) in handover.profile {
                let newer = state
                    .history
                    .profile
                    .get(&name)
                    .is_none_or(|cur| (entry.ts, entry.arrival) >= (cur.ts, cur.arrival));
                if newer {
                    state.history.profile.insert(name, entry);
                    profile_changed = true;
                }
            }
            for (name, tag) in handover.manual {
                let merged = match state.manual.get(&name) {
                    None => tag,
                    Some(ours) => ManualTag {
                        since: ours.since.min(tag.since),
                        expires_at: match (ours.expires_at, tag.expires_at) {
                            (Some(a), Some(b)) => Some(a.max(b)),
                            _ => None,
                        },
                    },
                };
                state.manual.insert(name, merged);
            }
            old_matches.extend(handover.old_matches);
        }
        state.history.events.sort_by_key(|e| (e.ts, e.arrival));
        // Every event tag judged again over the union, with the merged profile.
        let retention_ms = self.ctx.config.retention_ms;
        let cutoff = now.saturating_sub(retention_ms);
        old_matches.extend(
            state
                .event_tags
                .iter()
                .filter_map(|(name, tag)| tag.last_ts.filter(|t| *t <= cutoff).map(|t| (name.clone(), t))),
        );
        state.event_tags.clear();
        for def in rules.defs().iter().filter(|d| d.kind == DefKind::EventTag) {
            let mut tag = match_history(
                def.event_tag.as_ref().expect("event tag"),
                &state,
                now,
                retention_ms,
            );
            for (_, t) in old_matches.iter().filter(|(n, _)| *n == def.name) {
                tag.last_ts = Some(tag.last_ts.map_or(*t, |l| l.max(*t)));
            }
            if tag.last_ts.is_some() || !tag.future.is_empty() {
                state.event_tags.insert(def.name.clone(), tag);
            }
        }
        state.windows = None;
        if profile_changed {
            self.shard.batch.profiles.push(customer.clone());
        }
        self.evaluate(customer, &mut state, now, now, Scope::All, cause);
        self.put_back(customer.clone(), state);
        Ok(())
    }
}
