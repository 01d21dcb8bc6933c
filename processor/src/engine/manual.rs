//! Manual tags set and removed through the API (cause `manual`).

use super::*;

impl Engine {
    /// Sets a manual tag, held for `ttl_ms` (or until removed). Condition tags and segments
    /// are computed and cannot be set by hand.
    pub fn set_manual_tag(
        &mut self,
        customer_id: &str,
        tag: &str,
        ttl_ms: Option<i64>,
    ) -> Result<Vec<Change>, EngineError> {
        self.manual_tag(customer_id, tag, Some(ttl_ms))
    }

    pub fn remove_manual_tag(&mut self, customer_id: &str, tag: &str) -> Result<Vec<Change>, EngineError> {
        self.manual_tag(customer_id, tag, None)
    }

    pub(super) fn manual_tag(
        &mut self,
        customer_id: &str,
        tag: &str,
        set: Option<Option<i64>>,
    ) -> Result<Vec<Change>, EngineError> {
        if let Some(id) = self.rules.lookup(tag) {
            let kind = self.rules.def(id).kind;
            if kind != DefKind::EventTag {
                let what = match kind {
                    DefKind::Segment => "a segment",
                    DefKind::Trait => "a trait",
                    _ => "a condition tag",
                };
                return Err(EngineError::Conflict(format!(
                    "`{tag}` is {what}: it is computed by its rule and cannot be set or removed by hand"
                )));
            }
        }
        // An id a merge absorbed names its survivor.
        let customer = self.canonical_id(&rules::normalize(customer_id));
        if customer.is_empty() {
            return Err(EngineError::Conflict("empty customer id".into()));
        }
        let now = self.now_for(&customer);
        let ((), changes) = self.transact(|engine, _| {
            engine.with_worker(&customer, 0, |w| w.manual_tag(&customer, tag, set, now))
        })?;
        Ok(changes)
    }
}

impl Worker<'_> {
    fn manual_tag(
        &mut self,
        customer: &Arc<str>,
        tag: &str,
        set: Option<Option<i64>>,
        now: i64,
    ) -> Result<(), EngineError> {
        {
            let mut state = self.take_customer(customer, now)?;
            let name: Arc<str> = Arc::from(tag);
            match set {
                Some(ttl) => {
                    let expires_at = ttl.map(|t| now.saturating_add(t));
                    state.manual.insert(
                        name.clone(),
                        ManualTag {
                            since: now,
                            expires_at,
                        },
                    );
                }
                None => {
                    state.manual.remove(&name);
                    state.event_tags.remove(&name);
                }
            }
            let scope: Vec<DefId> = self.ctx.rules.lookup(tag).into_iter().collect();
            self.evaluate(
                customer,
                &mut state,
                now,
                now,
                Scope::Defs(&scope),
                &Cause::Manual,
            );
            self.put_back(customer.clone(), state);
            Ok(())
        }
    }
}
