//! Identity resolution in the engine ([`crate::identity`] has the graph's layout and the
//! normalisers). Resolution runs on the engine thread before an event is dealt to its
//! shard, so the shards only ever see canonical customer ids. A merge is made at the event
//! that causes it: on the shards of its customers, behind the events dealt to them before
//! ([`super::deal`]), the absorbed customers hand their retained history, profile and
//! manual tags to the survivor, who is
//! rebuilt from the union as if every event had always carried one id — all in the batch of
//! the round, so a crash leaves either no merge or all of it. An unmerge
//! ([`unmerge`](super::unmerge)) undoes one from what a merge keeps.

use super::*;

use crate::identity::{
    owner_key, owner_value, parse_owner_key, parse_owner_value, record_key, Cached, IdEntry, IdRecord,
    CUSTOMER_ID,
};
use crate::state::{read_manual, read_profile, write_manual, write_profile};
use crate::store::CF_IDENTITIES;

/// True for the graph keys the engine's [`crate::identity::OwnerCache`] holds: owners
/// (`i`) and records (`c`).
fn is_cached(key: &[u8]) -> bool {
    matches!(key.first(), Some(b'i' | b'c'))
}

/// An identifier's owner: its canonical customer, and the customer it first came with.
type Owner = (Arc<str>, Arc<str>);

/// A raw entry of the identity graph: key and value.
pub(super) type GraphEntry = (Vec<u8>, Vec<u8>);
use rules::{ProfileEntry, ProfileUpdate};

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
    /// The customer the event's best-ranked known identifier first came with (an absorbed
    /// customer's, when a merge brought it), kept with the event for an unmerge.
    pub origin: Option<Arc<str>>,
}

/// A merge made by hand: the survivor, the customers it absorbed, the changes.
#[derive(Debug)]
pub struct Merged {
    pub survivor: Arc<str>,
    pub absorbed: Vec<Arc<str>>,
    pub changes: Vec<Change>,
}

/// One retained event moving between customers, with what the store keeps beside it.
pub(super) struct Moved {
    pub event: rules::Event,
    pub event_id: Option<String>,
    /// The customer it belongs to (kept with it under its new customer).
    pub origin: Arc<str>,
    pub profile: Vec<ProfileUpdate>,
}

/// What an absorbed customer hands to the survivor.
pub(super) struct Handover {
    pub(super) events: Vec<Moved>,
    pub(super) profile: BTreeMap<Arc<str>, ProfileEntry>,
    pub(super) manual: BTreeMap<Arc<str>, ManualTag>,
    /// Event tag matches older than the retained history (kept, as a rebuild cannot find
    /// them again).
    pub(super) old_matches: Vec<(Arc<str>, i64)>,
}

/// What a merge keeps of an absorbed customer for an unmerge (graph key `s` + its id): its
/// profile, manual tags and old event tag matches as they were, and the survivor's profile
/// just before it was merged in.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    /// The arrival number of the first event after the merge.
    pub merged_at: u64,
    pub profile: BTreeMap<Arc<str>, ProfileEntry>,
    pub manual: BTreeMap<Arc<str>, ManualTag>,
    pub old_matches: Vec<(Arc<str>, i64)>,
    pub survivor_profile: BTreeMap<Arc<str>, ProfileEntry>,
}

pub(super) fn snapshot_key(customer: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + customer.len());
    key.push(b's');
    key.extend_from_slice(customer.as_bytes());
    key
}

/// In a group resolving identity in one partition, what a merge kept of `absorbed` for an
/// unmerge is kept where its survivor is: `u` + `survivor` + NUL + `absorbed`, a key of the
/// survivor's partition (the graph, partition 0's, is not where the survivor's events are).
pub(super) fn group_snapshot_key(survivor: &str, absorbed: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + survivor.len() + absorbed.len());
    key.push(b'u');
    key.extend_from_slice(survivor.as_bytes());
    key.push(0);
    key.extend_from_slice(absorbed.as_bytes());
    key
}

impl Snapshot {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u64(self.merged_at);
        write_profile(&mut w, &self.profile);
        write_manual(&mut w, &self.manual);
        write_old_matches(&mut w, &self.old_matches);
        write_profile(&mut w, &self.survivor_profile);
        w.buf
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Snapshot, crate::codec::CodecError> {
        let mut r = Reader::new(bytes);
        let merged_at = r.u64()?;
        let profile = read_profile(&mut r)?;
        let manual = read_manual(&mut r)?;
        let old_matches = read_old_matches(&mut r)?;
        Ok(Snapshot {
            merged_at,
            profile,
            manual,
            old_matches,
            survivor_profile: read_profile(&mut r)?,
        })
    }
}

/// Event tag matches older than the retained history, as snapshots and handover frames
/// keep them.
pub(super) fn write_old_matches(w: &mut Writer, old_matches: &[(Arc<str>, i64)]) {
    w.u64(old_matches.len() as u64);
    for (name, ts) in old_matches {
        w.str(name);
        w.i64(*ts);
    }
}

/// Reads what [`write_old_matches`] wrote.
pub(super) fn read_old_matches(r: &mut Reader) -> Result<Vec<(Arc<str>, i64)>, crate::codec::CodecError> {
    let mut old_matches = Vec::new();
    for _ in 0..r.u64()? {
        old_matches.push((r.arc_str()?, r.i64()?));
    }
    Ok(old_matches)
}

/// A canonical customer's identity graph entries, raw: its record, its identifiers'
/// owner keys, and the snapshots merges into it kept (what a partition export carries).
pub(super) fn entries_of(store: &Store, customer: &str) -> Result<Vec<GraphEntry>, StoreError> {
    let Some(bytes) = store.get(CF_IDENTITIES, &record_key(customer))? else {
        return Ok(Vec::new());
    };
    let record = IdRecord::decode(&bytes)?;
    let mut entries = vec![(record_key(customer), bytes)];
    for e in &record.ids {
        let key = owner_key(&e.id_type, &e.value);
        if let Some(value) = store.get(CF_IDENTITIES, &key)? {
            entries.push((key, value));
        }
    }
    for (absorbed, _) in &record.absorbed {
        let key = snapshot_key(absorbed);
        if let Some(value) = store.get(CF_IDENTITIES, &key)? {
            entries.push((key, value));
        }
    }
    Ok(entries)
}

/// In a group resolving identity in one partition, what merges into `survivor` kept for an
/// unmerge (its `u` keys), keyed as one store keeps it ([`snapshot_key`] of the absorbed).
pub(super) fn group_snapshots_of(store: &Store, survivor: &str) -> Result<Vec<GraphEntry>, StoreError> {
    let prefix = group_snapshot_key(survivor, "");
    Ok(store
        .scan_prefix(CF_IDENTITIES, &prefix)?
        .into_iter()
        .map(|(key, value)| {
            (
                snapshot_key(&String::from_utf8_lossy(&key[prefix.len()..])),
                value.into_vec(),
            )
        })
        .collect())
}

/// Every record (`c`) and owner (`i`) entry of the graph.
pub(super) fn whole_graph(store: &Store) -> Result<Vec<GraphEntry>, StoreError> {
    let mut entries = store.scan_prefix(CF_IDENTITIES, b"c")?;
    entries.extend(store.scan_prefix(CF_IDENTITIES, b"i")?);
    Ok(entries
        .into_iter()
        .map(|(key, value)| (key.into_vec(), value.into_vec()))
        .collect())
}

/// The engine's cache of the graph's owners and records: the whole graph when it fits (so
/// a new identifier needs no read to be known new), else as much of it as fits.
pub(super) fn load_owner_cache(
    store: &Store,
    capacity: usize,
) -> Result<crate::identity::OwnerCache, StoreError> {
    // Records (`c`) and owners (`i`) are the keys from `c` up to the snapshots (`s`).
    let entries = store
        .scan_from(CF_IDENTITIES, b"c")
        .take_while(|entry| entry.as_ref().map_or(true, |(key, _)| key.first() <= Some(&b'i')))
        .filter(|entry| entry.as_ref().map_or(true, |(key, _)| is_cached(key)));
    crate::identity::OwnerCache::whole(capacity, entries)
}

/// Every absorbed `customer_id` and the customer it resolves to, and the customers that
/// absorbed any (whose events keep the profile they set, for an unmerge).
#[derive(Debug, Default)]
pub(super) struct Aliases {
    to: HashMap<Arc<str>, Arc<str>>,
    survivors: HashSet<Arc<str>>,
}

impl Aliases {
    /// What the graph holds.
    pub(super) fn load(store: &Store) -> Result<Aliases, StoreError> {
        let prefix = owner_key(CUSTOMER_ID, "");
        let mut aliases = Aliases::default();
        for (key, value) in store.scan_prefix(CF_IDENTITIES, &prefix)? {
            if let Some((_, id)) = parse_owner_key(&key) {
                aliases.insert(Arc::from(id), Arc::from(parse_owner_value(&value).0));
            }
        }
        Ok(aliases)
    }

    pub(super) fn get(&self, id: &str) -> Option<&Arc<str>> {
        self.to.get(id)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.to.is_empty()
    }

    pub(super) fn insert(&mut self, id: Arc<str>, survivor: Arc<str>) {
        self.survivors.insert(survivor.clone());
        self.to.insert(id, survivor);
    }

    pub(super) fn remove(&mut self, id: &str) {
        self.to.remove(id);
    }

    /// True when `customer` absorbed another one: the profile its events set is kept with
    /// them (an unmerge rebuilds each side's profile from it).
    pub(super) fn is_survivor(&self, customer: &str) -> bool {
        self.survivors.contains(customer)
    }
}

/// The customers a merge by hand into `survivor` absorbs: `others` (each its canonical id,
/// or why not) once each, none of them the survivor, at least one.
pub(super) fn to_absorb(
    survivor: &Arc<str>,
    others: impl Iterator<Item = Result<Arc<str>, EngineError>>,
) -> Result<Vec<Arc<str>>, EngineError> {
    let mut absorbed: Vec<Arc<str>> = Vec::new();
    for other in others {
        let other = other?;
        if other == *survivor {
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
    Ok(absorbed)
}

/// Sets `profile`'s attributes from `updates` of an event at (`ts`, `arrival`) where it is
/// the newest to set them.
pub(super) fn apply_updates(
    profile: &mut BTreeMap<Arc<str>, ProfileEntry>,
    ts: i64,
    arrival: u64,
    updates: &[ProfileUpdate],
) {
    for (name, value) in updates {
        let newer = profile
            .get(name)
            .is_none_or(|cur| (ts, arrival) >= (cur.ts, cur.arrival));
        if newer {
            profile.insert(
                name.clone(),
                ProfileEntry {
                    ts,
                    arrival,
                    value: value.clone(),
                },
            );
        }
    }
}

/// Folds `other` into `profile`: the newest entry of each attribute wins.
pub(super) fn fold_profile(
    profile: &mut BTreeMap<Arc<str>, ProfileEntry>,
    other: &BTreeMap<Arc<str>, ProfileEntry>,
) {
    for (name, entry) in other {
        let newer = profile
            .get(name)
            .is_none_or(|cur| (entry.ts, entry.arrival) >= (cur.ts, cur.arrival));
        if newer {
            profile.insert(name.clone(), entry.clone());
        }
    }
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

    /// Every identifier `customer` owns, as (type, normalised value).
    pub fn identifiers(&self, customer: &str) -> Result<Vec<(Arc<str>, String)>, EngineError> {
        let record = self.id_record(customer, &Batch::default())?;
        Ok(record.ids.into_iter().map(|e| (e.id_type, e.value)).collect())
    }

    /// Merges `others` into `survivor` by hand (the "merge duplicate customers" permission):
    /// like a merge an event causes, the survivor rebuilt over the union of the histories, the
    /// change log recording it with `by` (the API key's name) as the cause. Identifier
    /// limits and earlier unmerges do not stand in the way: a person judged this.
    pub fn merge_customers(
        &mut self,
        survivor: &str,
        others: &[String],
        by: Option<&str>,
    ) -> Result<Merged, EngineError> {
        self.settle();
        if self.config.resolver {
            return self.merge_as_resolver(survivor, others, by);
        }
        let survivor = self.existing_customer(survivor)?;
        let absorbed = to_absorb(&survivor, others.iter().map(|o| self.existing_customer(o)))?;
        let cause = by.map_or(Cause::Manual, |k| Cause::ManualBy(k.to_owned()));
        let resolution = Resolution {
            canonical: survivor.clone(),
            absorbed: absorbed.clone(),
            attach: Vec::new(),
            minted: false,
            origin: None,
        };
        let (_, changes) = self.transact(|engine, batch| {
            let mut round = Round::by_hand();
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
    pub(super) fn existing_customer(&self, id: &str) -> Result<Arc<str>, EngineError> {
        let id = self.canonical_id(&rules::normalize(id));
        if id.is_empty() || self.read_customer(&id)?.is_none() {
            return Err(EngineError::NotFound(format!("no customer `{id}`")));
        }
        Ok(id)
    }

    /// A graph entry: this batch's, then a commit being written's, then the store's.
    /// Owners and records go through the cache, which every write of one passes through (so
    /// what it holds is the newest value, this batch's included).
    pub(super) fn identity_get(&self, key: &[u8], batch: &Batch) -> Result<Option<Arc<[u8]>>, StoreError> {
        if !is_cached(key) {
            // Snapshots, read by unmerges alone.
            return Ok(self.identity_read_through(key, batch)?.map(Arc::from));
        }
        Ok(match self.identity_cached(key, batch)? {
            Cached::Absent => None,
            Cached::Bytes(bytes) => Some(bytes),
            Cached::Owner { canonical, origin } => Some(Arc::from(owner_value(&canonical, &origin))),
        })
    }

    /// The owner of identifier key `key`: (its canonical customer, the customer it first
    /// came with). The path of every identifier of every event: a cache hit allocates
    /// nothing.
    fn owner_of(&self, key: &[u8], batch: &Batch) -> Result<Option<Owner>, StoreError> {
        Ok(match self.identity_cached(key, batch)? {
            Cached::Owner { canonical, origin } => Some((canonical, origin)),
            Cached::Absent | Cached::Bytes(_) => None,
        })
    }

    /// What the cache holds for an owner or record key, filled from the batch, a commit
    /// being written or the store when it does not know.
    fn identity_cached(&self, key: &[u8], batch: &Batch) -> Result<Cached, StoreError> {
        if let Some(held) = self.owner_cache.borrow_mut().get(key) {
            return Ok(held);
        }
        let value = self.identity_read_through(key, batch)?;
        let held = Cached::of(key, value.as_deref());
        self.owner_cache.borrow_mut().hold(key, held.clone());
        Ok(held)
    }

    fn identity_read_through(&self, key: &[u8], batch: &Batch) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(if let Some(v) = batch.identities.get(key) {
            v.clone()
        } else if let Some(v) = self.pending.as_ref().and_then(|p| p.done.identities.get(key)) {
            v.clone()
        } else {
            self.store.get(CF_IDENTITIES, key)?
        })
    }

    pub(super) fn identity_put(&self, batch: &mut Batch, key: Vec<u8>, value: Option<Vec<u8>>) {
        if is_cached(&key) {
            self.owner_cache.borrow_mut().put(&key, value.as_deref());
        }
        let cf = self.store.cf(CF_IDENTITIES);
        match &value {
            Some(v) => batch.wb.put_cf(cf, &key, v),
            None => batch.wb.delete_cf(cf, &key),
        }
        batch.identities.insert(key, value);
    }

    /// A canonical customer's record; a customer only ever named by its `customer_id` has
    /// none and owns just that.
    pub(super) fn id_record(&self, customer: &str, batch: &Batch) -> Result<IdRecord, StoreError> {
        Ok(match self.identity_get(&record_key(customer), batch)? {
            Some(bytes) => IdRecord::decode(&bytes)?,
            None => IdRecord::implicit(customer),
        })
    }

    /// True when `a` and `b` were split apart by hand (each record names the other, or an id
    /// merged into it since).
    fn kept_apart(
        &self,
        a: &IdRecord,
        b_id: &Arc<str>,
        b: &IdRecord,
        a_id: &Arc<str>,
        batch: &Batch,
    ) -> Result<bool, StoreError> {
        for (record, other) in [(a, b_id), (b, a_id)] {
            for x in &record.apart {
                if self.graph_canonical(x.clone(), batch)? == *other {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// The canonical customer a `customer_id` names in the identity graph: the survivor of
    /// the merge that absorbed it, or itself. On one store the aliases in memory answer; a
    /// group's resolver asks the graph (its aliases are only the customers handed over from
    /// its own partitions, which events applied there follow).
    pub(super) fn graph_canonical(&self, id: Arc<str>, batch: &Batch) -> Result<Arc<str>, StoreError> {
        if !self.config.resolver {
            return Ok(self.aliases.get(&id).cloned().unwrap_or(id));
        }
        Ok(match self.owner_of(&owner_key(CUSTOMER_ID, &id), batch)? {
            Some((canonical, _)) => canonical,
            None => id,
        })
    }

    /// Where an event's identifiers lead (`prepared`, its `customer_id` among them), or why
    /// it is rejected.
    pub(super) fn resolve(
        &self,
        customer_id: &Arc<str>,
        prepared: crate::identity::PreparedIds,
        batch: &Batch,
    ) -> Result<Result<Resolution, Rejection>, StoreError> {
        let config = &self.config.identity;
        let customer_id_type = config
            .position(CUSTOMER_ID)
            .expect("customer_id is always a type");
        for &i in &prepared.unusable {
            self.identity_counts.unusable(&config.types[i].name);
        }
        let ids = prepared.ids;
        if ids.is_empty() {
            return Ok(Err(Rejection::IdsUnusable));
        }
        let mut owners: Vec<Arc<str>> = Vec::new();
        let mut attach = Vec::new();
        let mut origin: Option<Arc<str>> = None;
        let mut key = Vec::new();
        for (i, value) in ids {
            let name = &config.types[i].name;
            if i == customer_id_type {
                // The event's own customer_id, or another one in `ids` beside it.
                let own = *value == **customer_id;
                let named = if own {
                    customer_id.clone()
                } else {
                    Arc::from(value.as_str())
                };
                origin.get_or_insert_with(|| named.clone());
                let owner = self.graph_canonical(named, batch)?;
                if !owners.contains(&owner) {
                    owners.push(owner);
                }
                continue;
            }
            key.clear();
            key.push(b'i');
            key.extend_from_slice(name.as_bytes());
            key.push(0);
            key.extend_from_slice(value.as_bytes());
            // A customer of a partition parked here (another node owns it) is not this
            // node's to merge into: identity is resolved among the partitions it owns —
            // unless the graph is the resolver partition's whole.
            let owner = self.owner_of(&key, batch)?.filter(|(canonical, _)| {
                self.config.resolver
                    || self.parked.partitions.is_empty()
                    || !self.parked.partitions.contains(&crate::partition::partition_of(
                        canonical.as_bytes(),
                        self.config.partitions,
                    ))
            });
            match owner {
                Some((canonical, first)) => {
                    origin.get_or_insert(first);
                    if !owners.contains(&canonical) {
                        owners.push(canonical);
                    }
                }
                None => attach.push((name.clone(), value)),
            }
        }
        let minted = owners.is_empty();
        let (canonical, absorbed) = match owners.len() {
            0 => {
                // No identifier known, and no customer_id (that always names one): every
                // identifier is new, the best-ranked first.
                let (name, value) = &attach[0];
                (Arc::from(crate::identity::minted(name, value)), Vec::new())
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
                let mut apart = false;
                for a in 0..owners.len() {
                    for b in a + 1..owners.len() {
                        apart |= self.kept_apart(&records[a], &owners[b], &records[b], &owners[a], batch)?;
                    }
                }
                if broken.is_empty() && !apart {
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
                    // Not the same person by the limits' judgement (a shared device), or
                    // split apart by hand: the event goes to the owner of its best
                    // identifier, nobody is merged.
                    for name in broken {
                        self.identity_counts.limit_hit(name);
                    }
                    if apart {
                        self.identity_counts.blocked();
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
            origin,
        }))
    }

    /// Applies a resolution before its event (at `step`, arrival `arrival`) is dealt: the
    /// round so far is run, the merge made, the new identifiers attached. Returns the
    /// event's origin (the customer its best identifier came with) when that is not the
    /// canonical customer.
    pub(super) fn settle_identity(
        &mut self,
        resolution: &Resolution,
        step: u64,
        arrival: u64,
        cause: &Cause,
        round: &mut Round<'_>,
        batch: &mut Batch,
    ) -> Result<Option<Arc<str>>, EngineError> {
        let canonical = &resolution.canonical;
        // The event belongs with its best known identifier's first customer (an unmerge
        // gives it back there); with none known, with the customer it makes.
        let origin = resolution.origin.clone().filter(|o| o != canonical);
        self.settle_graph(resolution, arrival, batch)?;
        if !resolution.absorbed.is_empty() {
            self.merge(canonical, &resolution.absorbed, (step, arrival), cause, round)?;
        }
        Ok(origin)
    }

    /// The graph's half of a resolution (at arrival `arrival`): the absorbed customers'
    /// identifiers re-pointed to the canonical one and their records folded into its
    /// record, the new identifiers attached within their types' limits.
    pub(super) fn settle_graph(
        &mut self,
        resolution: &Resolution,
        arrival: u64,
        batch: &mut Batch,
    ) -> Result<(), EngineError> {
        let canonical = &resolution.canonical;
        if resolution.absorbed.is_empty() && resolution.attach.is_empty() {
            return Ok(());
        }
        let mut record = match self.identity_get(&record_key(canonical), batch)? {
            Some(bytes) => Some(IdRecord::decode(&bytes).map_err(StoreError::from)?),
            None => None,
        };
        let mut changed = false;
        if !resolution.absorbed.is_empty() {
            let mut survivor = match record.take() {
                Some(r) => r,
                None => self.id_record(canonical, batch)?,
            };
            for absorbed in &resolution.absorbed {
                let theirs = self.id_record(absorbed, batch)?;
                self.adopt(canonical, &mut survivor, absorbed, theirs, batch)?;
                self.identity_put(batch, record_key(absorbed), None);
            }
            record = Some(survivor);
            changed = true;
            self.identity_counts.merged(resolution.absorbed.len());
        }
        let limits = &self.config.identity;
        for (id_type, value) in &resolution.attach {
            let record = record.get_or_insert_with(|| {
                if resolution.minted {
                    IdRecord {
                        created: arrival,
                        ..IdRecord::default()
                    }
                } else {
                    IdRecord {
                        created: arrival,
                        ..IdRecord::implicit(canonical)
                    }
                }
            });
            let max = limits
                .position(id_type)
                .and_then(|i| limits.types[i].max_per_customer);
            if max.is_some_and(|max| record.count(id_type) >= max) {
                self.identity_counts.limit_hit(id_type);
                continue;
            }
            record.ids.push(IdEntry {
                id_type: id_type.clone(),
                value: value.clone(),
                origin: canonical.clone(),
            });
            let owner = Some(owner_value(canonical, canonical));
            self.identity_put(batch, owner_key(id_type, value), owner);
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

    /// The graph's half of a merge: every identifier `theirs` (the record of `absorbed`)
    /// holds names `canonical` from now on, and `survivor` (the record of `canonical`)
    /// takes them over with what `absorbed` had absorbed and been kept apart from. The
    /// absorbed customer's own record is the caller's to delete where it is held.
    pub(super) fn adopt(
        &mut self,
        canonical: &Arc<str>,
        survivor: &mut IdRecord,
        absorbed: &Arc<str>,
        mut theirs: IdRecord,
        batch: &mut Batch,
    ) -> Result<(), StoreError> {
        if !theirs.owns(CUSTOMER_ID, absorbed) {
            // A customer made for an event without `customer_id` is named after its best
            // identifier: that name resolves to the survivor too.
            theirs.ids.push(IdEntry {
                id_type: Arc::from(CUSTOMER_ID),
                value: absorbed.to_string(),
                origin: absorbed.clone(),
            });
        }
        for entry in &theirs.ids {
            let owner = Some(owner_value(canonical, &entry.origin));
            self.identity_put(batch, owner_key(&entry.id_type, &entry.value), owner);
            // A resolver's aliases are the customers handed over from its partitions alone.
            if &*entry.id_type == CUSTOMER_ID && !self.config.resolver {
                self.aliases
                    .insert(Arc::from(entry.value.as_str()), canonical.clone());
            }
        }
        survivor.ids.append(&mut theirs.ids);
        survivor.absorbed.append(&mut theirs.absorbed);
        survivor.absorbed.push((absorbed.clone(), canonical.clone()));
        // A merge by hand overrides an earlier split; other splits carry over.
        let mut apart = Vec::with_capacity(survivor.apart.len() + theirs.apart.len());
        for other in std::mem::take(&mut survivor.apart)
            .into_iter()
            .chain(theirs.apart)
        {
            if self.graph_canonical(other.clone(), batch)? != *canonical && !apart.contains(&other) {
                apart.push(other);
            }
        }
        survivor.apart = apart;
        Ok(())
    }

    /// Moves each absorbed customer's retained history, profile and manual tags to
    /// `survivor` and rebuilds the survivor from the union; the absorbed leave every tag and
    /// segment and are deleted. What an unmerge needs is kept in the graph. In a dealt round
    /// nothing here waits: each absorbed customer leaves on its shard after the events dealt
    /// to it before this one, and the survivor's shard, at the same point of its queue,
    /// waits for their handovers and takes them over (events of the round's other customers
    /// may still be waiting: their changes keep their places in the log).
    fn merge(
        &mut self,
        survivor: &Arc<str>,
        absorbed: &[Arc<str>],
        (step, arrival): (u64, u64),
        cause: &Cause,
        round: &mut Round<'_>,
    ) -> Result<(), EngineError> {
        let now = self.now_for(survivor);
        let mut handovers = Vec::with_capacity(absorbed.len());
        for (part, customer) in absorbed.iter().enumerate() {
            let (handover, handed) = std::sync::mpsc::sync_channel(1);
            handovers.push(handed);
            let (leaving, into, why) = (customer.clone(), survivor.clone(), cause.clone());
            // The leaving half touches its customer alone: out of turn when it may.
            self.on_worker(round, customer, true, Place::merge(step, part), move |w| {
                let _ = handover.send(w.leave(&leaving, &into, now, &why)?);
                Ok(())
            })?;
        }
        let place = Place::merge(step, absorbed.len());
        let (into, gone, why) = (survivor.clone(), absorbed.to_vec(), cause.clone());
        self.on_worker(round, survivor, false, place, move |w| {
            let handovers = handovers
                .into_iter()
                .map(|handed| handed.recv().map_err(|_| super::deal::stopped()))
                .collect::<Result<Vec<_>, _>>()?;
            w.take_over(&into, &gone, handovers, (arrival, now), &why)
        })
    }
}

impl Worker<'_> {
    /// The survivor's half of a merge: it absorbs the handovers of `absorbed` (in order),
    /// and what an unmerge needs of each is kept in the graph (in this shard's batch).
    pub(super) fn take_over(
        &mut self,
        survivor: &Arc<str>,
        absorbed: &[Arc<str>],
        handovers: Vec<Handover>,
        (arrival, now): (u64, i64),
        cause: &Cause,
    ) -> Result<(), EngineError> {
        let snapshots: Vec<Snapshot> = handovers
            .iter()
            .map(|handover| Snapshot {
                merged_at: arrival,
                profile: handover.profile.clone(),
                manual: handover.manual.clone(),
                old_matches: handover.old_matches.clone(),
                survivor_profile: BTreeMap::new(),
            })
            .collect();
        let befores = self.absorb(survivor, handovers, now, cause)?;
        let cf = self.ctx.store.cf(CF_IDENTITIES);
        for ((customer, mut snapshot), before) in absorbed.iter().zip(snapshots).zip(befores) {
            snapshot.survivor_profile = before;
            let key = match self.ctx.config.resolver {
                true => group_snapshot_key(survivor, customer),
                false => snapshot_key(customer),
            };
            // In a group, where the survivor stood when the merge was decided, if its
            // partition noticed it ([`Engine::merge_noticed`]): events since may have
            // come before the frame.
            let noticed = match self.ctx.config.resolver {
                true => self.ctx.store.get(CF_IDENTITIES, &key)?,
                false => None,
            };
            if let Some(noticed) = noticed {
                let noticed = Snapshot::decode(&noticed).map_err(StoreError::from)?;
                snapshot.merged_at = noticed.merged_at;
                snapshot.survivor_profile = noticed.survivor_profile;
            }
            self.shard.batch.wb.put_cf(cf, key, snapshot.encode());
        }
        Ok(())
    }
}

impl ReadHandle {
    /// [`Engine::identify`] as of the last commit.
    pub fn identify(&self, id_type: &str, value: &str) -> Result<Option<Arc<str>>, EngineError> {
        lookup(&self.store, &self.identity, None, id_type, value)
    }

    /// [`ReadHandle::identify`] answered only for customers of `owned` (in a group, each
    /// node answers for its partitions; an identifier's entry is kept, and moves, with its
    /// customer's partition) — or, in a group resolving identity in partition 0
    /// ([`EngineConfig::resolver`]), by partition 0's owner alone, for every customer.
    pub fn identify_in(
        &self,
        id_type: &str,
        value: &str,
        owned: &[u32],
    ) -> Result<Option<Arc<str>>, EngineError> {
        if self.resolver {
            return match owned.contains(&0) {
                true => self.identify(id_type, value),
                false => Ok(None),
            };
        }
        Ok(self.identify(id_type, value)?.filter(|customer| {
            owned.contains(&crate::partition::partition_of(
                customer.as_bytes(),
                self.partitions,
            ))
        }))
    }

    /// The identifiers a canonical customer owns, as of the last commit.
    pub fn identifiers(&self, customer: &str) -> Result<Vec<(Arc<str>, String)>, EngineError> {
        let record = match self.store.get(CF_IDENTITIES, &record_key(customer))? {
            Some(bytes) => IdRecord::decode(&bytes).map_err(StoreError::from)?,
            None => IdRecord::implicit(customer),
        };
        Ok(record.ids.into_iter().map(|e| (e.id_type, e.value)).collect())
    }

    /// What identity resolution has done (`GET /v1/identities/stats`).
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
        Some(b) => Some(Arc::from(parse_owner_value(&b).0)),
        // A customer_id nobody absorbed names itself.
        None if id_type == CUSTOMER_ID => Some(Arc::from(normal)),
        None => None,
    })
}

impl Worker<'_> {
    /// The committed events of `customer` with what the store keeps beside them, by
    /// arrival; those of this round (not in the store yet) are not there.
    pub(super) fn stored_events(
        &self,
        customer: &str,
    ) -> Result<HashMap<u64, crate::store::StoredEvent>, EngineError> {
        Ok(self
            .committed_events(customer)?
            .into_iter()
            .map(|e| (e.event.arrival, e))
            .collect())
    }

    /// Ends a customer: every tag and segment left (`remove` changes at `now`), the record,
    /// the retained events, the window chunks and the timer deleted, the cache forgotten.
    /// Returns the state as it was (with its history; `committed` is what the store holds
    /// of its events, read by the caller).
    pub(super) fn remove_customer(
        &mut self,
        customer: &Arc<str>,
        now: i64,
        cause: &Cause,
        committed: Vec<rules::Event>,
    ) -> Result<Box<CustomerState>, EngineError> {
        let mut state = self.take_customer(customer, now)?;
        if !state.history_loaded {
            self.install_history(customer, &mut state, now, committed.into_iter());
        }
        let rules = self.ctx.rules;
        for name in std::mem::take(&mut state.members).into_keys() {
            let kind = match rules.lookup(&name).map(|id| rules.def(id).kind) {
                Some(DefKind::Segment) => MemberKind::Segment,
                _ => MemberKind::Tag,
            };
            self.record_change(customer, kind, name, Op::Remove, now, cause);
        }
        self.schedule(customer, &mut state, None);
        self.ctx
            .store
            .forget_customer(&mut self.shard.batch.wb, customer, &state);
        let batch = &mut self.shard.batch;
        batch.events.remove(customer);
        batch.dirty.remove(customer);
        if let Some(written) = &mut batch.written {
            written.forget(customer);
        }
        batch.gone.insert(customer.clone(), state.number);
        if state.number != crate::index::NO_NUMBER && !state.history.profile.is_empty() {
            batch
                .cleared
                .push((state.number, state.history.profile.keys().cloned().collect()));
        }
        Ok(state)
    }

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
        self.depart(customer, now, cause)
    }

    /// The absorbed customer's half of a merge without its record in the change log (the
    /// survivor's side makes that): it leaves every tag and segment and is deleted.
    /// Returns what the survivor takes over.
    pub(super) fn depart(
        &mut self,
        customer: &Arc<str>,
        now: i64,
        cause: &Cause,
    ) -> Result<Handover, EngineError> {
        self.shard.batch.placed_out_of_order = true;
        let exists = self.shard.cache.contains_key(customer)
            || self
                .ctx
                .store
                .get(crate::store::CF_CUSTOMERS, customer.as_bytes())?
                .is_some();
        if !exists {
            // Named for the first time by events of this round, which are the survivor's now.
            return Ok(Handover {
                events: Vec::new(),
                profile: BTreeMap::new(),
                manual: BTreeMap::new(),
                old_matches: Vec::new(),
            });
        }
        // One read of its stored events: their history, and what is kept beside each.
        let mut stored = HashMap::new();
        let mut committed = Vec::new();
        for e in self.committed_events(customer)? {
            stored.insert(e.event.arrival, (e.event_id, e.origin.map(Arc::from), e.profile));
            committed.push(e.event);
        }
        // Events of this batch are not in the store yet; the batch keeps what it wrote for
        // them in a round with identifiers (the only kind that merges as events arrive). The
        // moved copy keeps their id and the customer they belong to, not the profile they
        // set (applied already, and kept with the merge).
        if let Some(written) = &self.shard.batch.written {
            for kept in written.get(customer).flatten().unwrap_or_default() {
                if let std::collections::hash_map::Entry::Vacant(slot) = stored.entry(kept.arrival) {
                    let e = written.decode(kept).map_err(StoreError::from)?;
                    slot.insert((e.event_id, e.origin.map(Arc::from), Vec::new()));
                }
            }
        }
        let mut state = self.remove_customer(customer, now, cause, committed)?;
        let cutoff = now.saturating_sub(self.ctx.config.retention_ms);
        Ok(Handover {
            events: std::mem::take(&mut state.history.events)
                .into_iter()
                .map(|event| {
                    let (event_id, origin, profile) = stored.remove(&event.arrival).unwrap_or_default();
                    Moved {
                        origin: origin.unwrap_or_else(|| customer.clone()),
                        event_id,
                        profile,
                        event,
                    }
                })
                .collect(),
            profile: std::mem::take(&mut state.history.profile),
            manual: std::mem::take(&mut state.manual),
            old_matches: old_matches(&state, cutoff),
        })
    }

    /// The survivor takes over the absorbed customers' events, profile (the newest value of
    /// each attribute by `ts`, then arrival), manual tags, and is judged again over the union
    /// of the histories. Returns the survivor's profile before each handover.
    fn absorb(
        &mut self,
        customer: &Arc<str>,
        handovers: Vec<Handover>,
        now: i64,
        cause: &Cause,
    ) -> Result<Vec<BTreeMap<Arc<str>, ProfileEntry>>, EngineError> {
        self.shard.batch.placed_out_of_order = true;
        let mut state = self.take_customer(customer, now)?;
        self.load_history(customer, &mut state, now)?;
        let store = self.ctx.store;
        let mut befores = Vec::with_capacity(handovers.len());
        let mut old = Vec::new();
        for handover in handovers {
            befores.push(state.history.profile.clone());
            for moved in handover.events {
                let origin = Some(&*moved.origin).filter(|o| **o != **customer);
                store.put_event(
                    &mut self.shard.batch.wb,
                    customer,
                    &moved.event,
                    moved.event_id.as_deref(),
                    origin,
                    &moved.profile,
                );
                self.shard
                    .batch
                    .keep_written(customer, moved.event.ts, moved.event.arrival);
                state.history.events.push(moved.event);
                state.has_events = true;
            }
            fold_profile(&mut state.history.profile, &handover.profile);
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
            old.extend(handover.old_matches);
        }
        self.rebuild(customer, state, old, now, cause);
        Ok(befores)
    }

    /// Judges a customer whose history, profile or manual tags were replaced (a merge, an
    /// unmerge) anew: event tags matched again over the history (with `old` matches past
    /// it), windows rebuilt, every definition evaluated, the profile columns updated.
    pub(super) fn rebuild(
        &mut self,
        customer: &Arc<str>,
        mut state: Box<CustomerState>,
        mut old: Vec<(Arc<str>, i64)>,
        now: i64,
        cause: &Cause,
    ) {
        let rules = self.ctx.rules;
        let retention_ms = self.ctx.config.retention_ms;
        state.history.events.sort_by_key(|e| (e.ts, e.arrival));
        old.extend(old_matches(&state, now.saturating_sub(retention_ms)));
        state.event_tags.clear();
        for def in rules.defs().iter().filter(|d| d.kind == DefKind::EventTag) {
            let spec = def.event_tag.as_ref().expect("event tag");
            let mut tag = match_history(spec, &state, now, retention_ms);
            for (_, t) in old.iter().filter(|(n, _)| *n == def.name) {
                tag.last_ts = Some(tag.last_ts.map_or(*t, |l| l.max(*t)));
            }
            if tag.last_ts.is_some() || !tag.future.is_empty() {
                state.event_tags.insert(def.name.clone(), tag);
            }
        }
        state.windows = None;
        self.shard.batch.profiles.push(customer.clone());
        self.evaluate(customer, &mut state, now, now, Scope::All, cause);
        self.put_back(customer.clone(), state);
    }
}

/// A customer's event tag matches older than the retained history (`cutoff`).
fn old_matches(state: &CustomerState, cutoff: i64) -> Vec<(Arc<str>, i64)> {
    state
        .event_tags
        .iter()
        .filter_map(|(name, tag)| tag.last_ts.filter(|t| *t <= cutoff).map(|t| (name.clone(), t)))
        .collect()
}
