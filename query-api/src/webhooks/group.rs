//! A group subscription delivered from the group's change log (issue #21,
//! `docs/design/cluster.md` §7 step 9). In a group of several that keeps the group log (a
//! changes topic), each subscription of the group is delivered by one node — the live member
//! ranking highest by FNV-1a of its address and the subscription's id, as standby copies are
//! picked — from the group log, which holds every node's published changes by
//! `(partition, pseq)`. So the changes a node made are delivered whether or not that node
//! is still there: a node lost for good no longer takes its undelivered changes with it.
//!
//! Where the deliveries stand is a group cursor (each partition's last `pseq` delivered),
//! kept in the deliverer's store and told to the group on the control topic (kind
//! [`CURSOR_KIND`], one record per subscription and node, compacted to the last) at most
//! once a [`SHARE_EVERY`] and when the node stops delivering. Every node merges the records
//! (per partition, the furthest) and holds its group log from there. A node that becomes
//! the deliverer (a node joined, left or died) starts from the merged cursor: what was
//! delivered after the last record is sent again — at least once; a batch's delivery id
//! `ID-P.PSEQ` (its first change) and each change's `(partition, pseq)` are the same
//! whichever node sends it, so receivers drop repeats.

use processor::kafka::control::{Control, Shared};
use processor::kafka::members::Members;

use super::*;

/// The control topic's records of where a node's deliveries of a subscription stand.
pub(super) const CURSOR_KIND: &str = "webhook_cursor";

/// How often the deliverer tells the group where it stands (while it delivers).
const SHARE_EVERY: Duration = Duration::from_secs(1);
/// How often a node that does not deliver a subscription looks whether it now should.
const LOOK_EVERY: Duration = Duration::from_millis(500);
/// How long the deliverer waits for the group log to take changes in before it looks
/// again anyway.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// A node that becomes the deliverer waits this long before it starts, for the cursor of
/// the one before (when that one stops cleanly) and for the cards of the others (when it
/// has just started itself).
const HANDOVER_WAIT: Duration = Duration::from_secs(2);
/// Changes of other names one read of a named subscription looks past.
const SCAN: usize = 10_000;

/// A node's delivery cursor of a subscription, as the control topic carries it.
#[derive(Serialize, Deserialize)]
struct CursorRecord {
    subscription: u64,
    node: String,
    cursor: Vec<u64>,
}

/// Where the group's deliveries of each subscription stand, merged from every node's
/// cursor records: per partition, the furthest any node delivered.
#[derive(Default)]
pub(super) struct GroupCursors(Mutex<HashMap<u64, Vec<u64>>>);

impl GroupCursors {
    /// Takes in a cursor of subscription `id` (a record read, or this node's own).
    fn merge(&self, id: u64, cursor: &[u64]) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let merged = all.entry(id).or_insert_with(|| cursor.to_vec());
        if merged.len() != cursor.len() {
            tracing::warn!(
                webhook = id,
                "a delivery cursor of {} partitions where the group has {}: ignored",
                cursor.len(),
                merged.len()
            );
            return;
        }
        for (m, c) in merged.iter_mut().zip(cursor) {
            *m = (*m).max(*c);
        }
    }

    fn get(&self, id: u64) -> Option<Vec<u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned()
    }

    pub(super) fn forget(&self, id: u64) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }
}

impl Webhooks {
    /// In a group that delivers from the group log: from now on every node's delivery
    /// cursor record is merged here (those before first). Call before the subscriptions
    /// start ([`Webhooks::resume`]), so that a node that becomes a deliverer starts where
    /// the group is.
    pub fn follow_cursors(self: &Arc<Self>, control: &Control) {
        let hooks = self.clone();
        control.on_shared(
            CURSOR_KIND,
            Box::new(move |shared: &Shared| {
                match serde_json::from_value::<CursorRecord>(shared.body.clone()) {
                    Ok(record) => hooks.group_cursors.merge(record.subscription, &record.cursor),
                    Err(e) => tracing::warn!(id = %shared.id, error = %e, "a webhook delivery cursor from the group does not parse"),
                }
            }),
        );
    }
}

/// The members of the group, when `sub` is delivered from the group log on this node: a
/// subscription of the group (not one node's alone) where the group log is kept.
pub(super) fn delivered_by_group(app: &AppState, sub: &Subscription) -> Option<Arc<Members>> {
    if sub.node_only {
        return None;
    }
    group_log_kept(app)
}

/// The members of the group, when this node is in a group of several that shares its
/// subscriptions (a control topic) and keeps the group's change log (a changes topic).
pub(super) fn group_log_kept(app: &AppState) -> Option<Arc<Members>> {
    app.control.as_ref()?;
    let cluster = app.cluster.as_ref()?;
    app.kafka.as_ref()?.group_log().ok()?;
    Some(cluster.members().clone())
}

/// The node that delivers subscription `id`: of the live members, the one ranking highest
/// by FNV-1a of its address and the id — the same on every node that sees the same cards.
pub(super) fn deliverer(members: &Members, id: u64) -> Option<String> {
    members
        .cards()
        .into_iter()
        .map(|card| card.url)
        .max_by_key(|url| {
            (
                processor::kafka::members::rank(url, &id.to_be_bytes()),
                url.clone(),
            )
        })
}

fn cursor_key(id: u64) -> Vec<u8> {
    [b"gcur:".as_slice(), &id.to_be_bytes()].concat()
}

/// This node's last delivery cursor of subscription `id` (it delivered it before).
fn stored_cursor(reader: &ReadHandle, id: u64) -> Result<Option<Vec<u64>>, ApiError> {
    let Some(bytes) = reader
        .store()
        .get(CF_WEBHOOKS, &cursor_key(id))
        .map_err(processor::EngineError::from)?
    else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ApiError::Internal(format!("stored webhook cursor: {e}")))
}

fn store_cursor(reader: &ReadHandle, id: u64, cursor: &[u64]) -> Result<(), ApiError> {
    let value = serde_json::to_vec(cursor).expect("a cursor serialises");
    reader
        .store()
        .put_now(CF_WEBHOOKS, &cursor_key(id), &value)
        .map_err(|e| processor::EngineError::from(e).into())
}

/// Forgets this node's delivery cursor of subscription `id` (deleted).
pub(super) fn delete_cursor(reader: &ReadHandle, id: u64) -> Result<(), ApiError> {
    reader
        .store()
        .delete_prefix_now(CF_WEBHOOKS, &cursor_key(id))
        .map(|_| ())
        .map_err(|e| processor::EngineError::from(e).into())
}

/// Where the group's deliveries of `sub` stand as this node knows: the merged cursor, at
/// least the subscription's start. `None` for a subscription made before deliveries came
/// from the group log that no node has delivered from it yet.
pub(super) fn group_position(hooks: &Webhooks, sub: &Subscription) -> Option<Vec<u64>> {
    furthest(hooks.group_cursors.get(sub.id), sub.group_start.clone())
}

/// Per partition, the furthest of two cursors; either may be missing (of two that do not
/// name the same partitions, the first).
fn furthest(a: Option<Vec<u64>>, b: Option<Vec<u64>>) -> Option<Vec<u64>> {
    match (a, b) {
        (Some(a), Some(b)) if a.len() == b.len() => Some(a.iter().zip(&b).map(|(x, y)| *x.max(y)).collect()),
        (Some(a), _) => Some(a),
        (None, b) => b,
    }
}

/// Where this node, now the deliverer, starts: the furthest of its own last cursor, the
/// group's and the subscription's start; the group log's end for a subscription that has
/// none of them (made before deliveries came from the group log).
fn starting_cursor(reader: &ReadHandle, hooks: &Webhooks, sub: &Subscription) -> Result<Vec<u64>, ApiError> {
    match furthest(group_position(hooks, sub), stored_cursor(reader, sub.id)?) {
        Some(cursor) => Ok(cursor),
        None => Ok(reader.group_log_end()?),
    }
}

/// What the next read of the group log gave `sub`.
enum Read {
    /// The changes of its name (at most a batch) and the cursor after them (past changes
    /// of other names, too).
    Batch(Vec<Change>, Vec<u64>),
    /// Retention (or the topic's) went past the cursor: the oldest cursor held.
    Gone(Vec<u64>),
}

fn next_batch(
    reader: &ReadHandle,
    sub: &Subscription,
    cursor: &[u64],
    batch: usize,
) -> Result<Read, ApiError> {
    let (found, through) = match sub.name.as_deref() {
        None => match reader.group_log_page(cursor, batch)? {
            processor::GroupPage::Changes { changes, cursor } => (changes, cursor),
            processor::GroupPage::Gone { oldest, .. } => return Ok(Read::Gone(oldest)),
        },
        Some(name) => match reader.group_log_of(name, cursor, SCAN)? {
            Ok((mut matches, scanned)) => {
                let through = if matches.len() > batch {
                    matches.truncate(batch);
                    matches[batch - 1].1.clone()
                } else {
                    scanned
                };
                (matches.into_iter().map(|(json, _)| json).collect(), through)
            }
            Err(processor::GroupPage::Gone { oldest, .. }) => return Ok(Read::Gone(oldest)),
            Err(processor::GroupPage::Changes { .. }) => unreachable!("a walk ends with a cursor or gone"),
        },
    };
    let mut changes = Vec::with_capacity(found.len());
    for json in &found {
        match Change::from_json(json) {
            Some(change) => changes.push(change),
            None => tracing::error!(
                webhook = sub.id,
                "a change of the group log does not read as a change; not delivered"
            ),
        }
    }
    Ok(Read::Batch(changes, through))
}

/// Tells the group where this node's deliveries of `id` stand (and takes it in here).
async fn share_cursor(app: &AppState, hooks: &Webhooks, id: u64, me: &str, cursor: &[u64]) {
    hooks.group_cursors.merge(id, cursor);
    let Some(control) = app.control.clone() else {
        return;
    };
    let record = Shared {
        kind: CURSOR_KIND.into(),
        id: format!("{id}|{me}"),
        body: serde_json::to_value(CursorRecord {
            subscription: id,
            node: me.to_owned(),
            cursor: cursor.to_vec(),
        })
        .expect("a cursor record serialises"),
        latest: true,
    };
    let sent = tokio::task::spawn_blocking(move || control.share(&record)).await;
    if let Ok(Err(e)) = sent {
        tracing::warn!(webhook = id, error = %e, "telling the group where webhook deliveries stand failed; it is told again");
    }
}

/// One group subscription's loop on this node: idle (holding the group log at the group's
/// cursor) while another node delivers it, delivering from the group log while this node
/// is the deliverer. Runs until aborted, or at shutdown once what the group log holds is
/// delivered.
pub(super) async fn deliver(
    app: AppState,
    config: WebhookConfig,
    sub: Subscription,
    members: Arc<Members>,
    mut draining: tokio::sync::watch::Receiver<bool>,
) {
    let client = client(&config);
    let hooks = app.webhooks.clone();
    let reader = app.engine.reader().clone();
    let me = members.url().to_owned();
    let hold = cursor_name(sub.id);
    let label = sub.id.to_string();
    let mut appended = reader.group_log_appended();
    // While delivering: the cursor, and the last one told to the group (and when).
    let mut delivering: Option<(Vec<u64>, Vec<u64>, Instant)> = None;
    loop {
        let stopping = *draining.borrow();
        if deliverer(&members, sub.id).as_deref() != Some(me.as_str()) {
            if let Some((cursor, _, _)) = delivering.take() {
                tracing::info!(webhook = sub.id, "another node delivers this subscription now");
                share_cursor(&app, &hooks, sub.id, &me, &cursor).await;
                // The deliverer reports the lag: summed over the nodes, it is counted once.
                metrics::gauge!("tagstream_webhook_lag_changes", "subscription" => label.clone()).set(0.0);
            }
            if let Some(at) = group_position(&hooks, &sub) {
                reader.hold_group_log(&hold, &at);
            }
            if stopping {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(LOOK_EVERY) => {}
                _ = draining.changed() => {}
            }
            continue;
        }
        let (cursor, told, told_at) = match delivering.take() {
            Some(state) => state,
            None => {
                if !stopping {
                    tokio::select! {
                        _ = tokio::time::sleep(HANDOVER_WAIT) => {}
                        _ = draining.changed() => {}
                    }
                }
                if deliverer(&members, sub.id).as_deref() != Some(me.as_str()) {
                    continue;
                }
                let (step, s) = (reader.clone(), sub.clone());
                let hooks = hooks.clone();
                match tokio::task::spawn_blocking(move || starting_cursor(&step, &hooks, &s)).await {
                    Ok(Ok(cursor)) => {
                        tracing::info!(webhook = sub.id, cursor = %processor::encode_group_cursor(&cursor), "delivering this subscription from the group's change log");
                        (cursor.clone(), Vec::new(), Instant::now())
                    }
                    Ok(Err(e)) => {
                        tracing::error!(webhook = sub.id, error = %e, "where to deliver from is unreadable; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    Err(_) => return,
                }
            }
        };
        reader.hold_group_log(&hold, &cursor);
        // What the group log takes in from here on wakes the wait below.
        appended.borrow_and_update();
        let (step, s, at) = (reader.clone(), sub.clone(), cursor.clone());
        let read = tokio::task::spawn_blocking(move || next_batch(&step, &s, &at, config.batch)).await;
        let (changes, through) = match read {
            Ok(Ok(Read::Batch(changes, through))) => (changes, through),
            Ok(Ok(Read::Gone(oldest))) => {
                let skipped: u64 = oldest
                    .iter()
                    .zip(&cursor)
                    .map(|(o, c)| o.saturating_sub(*c))
                    .sum();
                tracing::error!(
                    webhook = sub.id,
                    from = %processor::encode_group_cursor(&cursor),
                    to = %processor::encode_group_cursor(&oldest),
                    skipped,
                    "the group's change log no longer holds changes this subscription had not delivered (retention of the changes topic or of this node's group log): delivery goes on from the oldest held"
                );
                metrics::counter!("tagstream_webhook_changes_skipped_total", "subscription" => label.clone())
                    .increment(skipped);
                delivering = Some((
                    furthest(Some(oldest), Some(cursor)).unwrap_or_default(),
                    told,
                    told_at,
                ));
                continue;
            }
            Ok(Err(e)) => {
                tracing::error!(webhook = sub.id, error = %e, "reading the group's change log failed; retrying");
                delivering = Some((cursor, told, told_at));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => return,
        };
        let end = reader.group_log_end().unwrap_or_default();
        let lag: u64 = end.iter().zip(&through).map(|(e, t)| e.saturating_sub(*t)).sum();
        metrics::gauge!("tagstream_webhook_lag_changes", "subscription" => label.clone()).set(lag as f64);
        if through == cursor {
            let (told, told_at) = if told != cursor && (stopping || told_at.elapsed() >= SHARE_EVERY) {
                share_cursor(&app, &hooks, sub.id, &me, &cursor).await;
                (cursor.clone(), Instant::now())
            } else {
                (told, told_at)
            };
            if stopping {
                // Shutting down, and what the group log holds is delivered and told.
                return;
            }
            delivering = Some((cursor, told, told_at));
            tokio::select! {
                _ = tokio::time::timeout(POLL_EVERY, appended.changed()) => {}
                _ = draining.changed() => {}
            }
            continue;
        }
        if let Some(first) = changes.first() {
            let (partition, pseq) = first.pseq.unwrap_or_default();
            let masking = masking_for(&app, &sub);
            let numbering = match group_letter_key(&reader, sub.id) {
                Ok(key) => key,
                Err(e) => {
                    tracing::error!(webhook = sub.id, error = %e, "numbering dead letters failed; retrying");
                    delivering = Some((cursor, told, told_at));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let last = changes.last().and_then(|c| c.pseq).unwrap_or_default();
            let batch = Batch {
                changes: &changes,
                delivery: format!("{}-{partition}.{pseq}", sub.id),
                letter_key: numbering,
                numbers: json!({
                    "first": { "partition": partition, "pseq": pseq },
                    "last": { "partition": last.0, "pseq": last.1 },
                }),
            };
            send_with_retries(&client, &reader, &config, &sub, &batch, &masking).await;
        }
        if let Err(e) = store_cursor(&reader, sub.id, &through) {
            tracing::error!(webhook = sub.id, error = %e, "saving the webhook cursor failed");
        }
        reader.hold_group_log(&hold, &through);
        let (told, told_at) = if told_at.elapsed() >= SHARE_EVERY {
            share_cursor(&app, &hooks, sub.id, &me, &through).await;
            (through.clone(), Instant::now())
        } else {
            (told, told_at)
        };
        delivering = Some((through, told, told_at));
    }
}

/// The key of the next dead letter of a group delivery of subscription `id`: numbered by
/// this node (a group batch has no `seq` of its own), after every `seq`-keyed one.
fn group_letter_key(reader: &ReadHandle, id: u64) -> Result<u64, ApiError> {
    let name = format!("webhook_letters:{id}");
    let next = reader.cursor(&name)? + 1;
    reader.set_cursor(&name, next)?;
    Ok((1 << 63) | next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_cursors_keep_the_furthest_of_each_partition_in_any_order() {
        let orders: [[&[u64]; 3]; 2] = [
            [&[3, 0, 7], &[1, 5, 2], &[2, 2, 9]],
            [&[2, 2, 9], &[3, 0, 7], &[1, 5, 2]],
        ];
        for order in orders {
            let cursors = GroupCursors::default();
            for cursor in order {
                cursors.merge(4, cursor);
            }
            assert_eq!(cursors.get(4), Some(vec![3, 5, 9]));
            cursors.merge(4, &[1, 1]);
            assert_eq!(
                cursors.get(4),
                Some(vec![3, 5, 9]),
                "a cursor of another partition count is ignored"
            );
        }
    }

    #[test]
    fn a_deliverer_starts_from_the_furthest_cursor_it_knows() {
        assert_eq!(furthest(Some(vec![3, 0]), Some(vec![1, 4])), Some(vec![3, 4]));
        assert_eq!(furthest(None, Some(vec![1, 4])), Some(vec![1, 4]));
        assert_eq!(furthest(Some(vec![1, 4]), None), Some(vec![1, 4]));
        assert_eq!(furthest(Some(vec![1, 4]), Some(vec![9])), Some(vec![1, 4]));
        assert_eq!(furthest(None, None), None);
    }
}
