//! `GET /v1/customers/{id}/explain/{name}`: why a customer has a value, and when time alone
//! would change it.

use std::sync::Arc;

use rules::{DefKind, ExplainNode, Facts, Value};

use super::{Engine, EngineError};
use crate::state::{EngineFacts, Membership};

/// How far ahead [`Engine::explain`] follows candidate instants that turn out not to change
/// the value (a window exit that leaves the sum above the threshold, say).
const MAX_CANDIDATES: usize = 64;

/// One name explained for one customer at the engine's `now`.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    pub customer_id: String,
    pub name: Arc<str>,
    /// `tag`, `event_tag`, `segment`, `trait` or `manual_tag` (a name only set by hand).
    pub kind: &'static str,
    pub now: i64,
    pub value: Value,
    /// The stored membership, for tags and segments the customer is in.
    pub membership: Option<Membership>,
    /// Set by hand (event tags and names the rules do not define): until when.
    pub manual: Option<Option<i64>>,
    /// The evaluation, node by node; `None` for a name only set by hand.
    pub tree: Option<ExplainNode>,
    /// The next instant the value changes by time alone, if no event arrives first.
    pub next_change: Option<NextChange>,
}

/// The answer of [`Engine::explain`].
#[derive(Debug, Clone, PartialEq)]
pub enum Explained {
    Yes(Box<Explanation>),
    /// The customer was never seen.
    UnknownCustomer,
    /// Neither defined by the rules nor set by hand on this customer.
    UnknownName,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NextChange {
    pub at: i64,
    pub value: Value,
}

impl Engine {
    /// Explains `name` (a definition, or a tag set by hand) for a customer at `now`.
    pub fn explain(&self, customer_id: &str, name: &str) -> Result<Explained, EngineError> {
        let id = rules::normalize(customer_id).into_owned();
        let Some(mut state) = self.read_customer(&id)? else {
            return Ok(Explained::UnknownCustomer);
        };
        let now = self.now_for(&id);
        let retention = self.config.retention_ms;
        let rules = &self.rules;
        state.advance_windows(rules, now, retention);
        let membership = state.members.get(name).cloned();
        let manual = state
            .manual
            .get(name)
            .filter(|m| m.expires_at.is_none_or(|e| now < e))
            .map(|m| m.expires_at);
        let Some(def_id) = rules.lookup(name) else {
            // A name the rules do not define: only a manual tag can give it a value.
            if manual.is_none() && membership.is_none() {
                return Ok(Explained::UnknownName);
            }
            return Ok(Explained::Yes(Box::new(Explanation {
                customer_id: id,
                name: Arc::from(name),
                kind: "manual_tag",
                now,
                value: Value::Bool(manual.is_some()),
                membership,
                manual,
                tree: None,
                next_change: manual.flatten().map(|at| NextChange {
                    at,
                    value: Value::Bool(false),
                }),
            })));
        };
        let def = rules.def(def_id);
        let facts = EngineFacts::new(rules, &state, now, retention);
        let tree = rules.explain(def_id, &facts);
        let value = tree.value.clone();
        // Candidate instants may be early (a window exit that leaves the value as it was):
        // evaluate at each until the value differs.
        let mut next_change = None;
        // A tag set by hand on an event tag's name ends at its expiry.
        let manual_expiry = |after: i64| manual.flatten().filter(|e| *e > after);
        let earliest = |a: Option<i64>, b: Option<i64>| a.into_iter().chain(b).min();
        let mut candidate = earliest(rules.next_change_of(def_id, &facts), manual_expiry(now));
        for _ in 0..MAX_CANDIDATES {
            let Some(at) = candidate else { break };
            let mut later = state.clone();
            later.advance_windows(rules, at, retention);
            let facts = EngineFacts::new(rules, &later, at, retention);
            let v = facts.definition(def_id);
            if v != value {
                next_change = Some(NextChange { at, value: v });
                break;
            }
            candidate = earliest(rules.next_change_of(def_id, &facts), manual_expiry(at));
        }
        Ok(Explained::Yes(Box::new(Explanation {
            customer_id: id,
            name: def.name.clone(),
            kind: match def.kind {
                DefKind::ConditionTag => "tag",
                DefKind::EventTag => "event_tag",
                DefKind::Segment => "segment",
                DefKind::Trait => "trait",
            },
            now,
            value,
            membership,
            manual,
            tree: Some(tree),
            next_change,
        })))
    }
}
