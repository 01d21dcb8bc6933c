//! Evaluation of compiled definitions against the facts of one customer at one `now`.

use rust_decimal::Decimal;

use crate::ast::BinaryOp;
use crate::compile::{AggId, CompiledRules, DefId, DefKind, Node};
use crate::event::Event;
use crate::value::Value;

/// What the engine knows of one customer at one instant. The engine implements it over
/// its stored state; [`crate::history::CustomerHistory`] implements it by brute force.
pub trait Facts {
    /// The evaluation instant, ms since the Unix epoch.
    fn now(&self) -> i64;
    /// The value of an aggregate at `now`.
    fn aggregate(&self, id: AggId) -> Value;
    /// A profile attribute; `Value::Null` when unset.
    fn profile(&self, name: &str) -> Option<Value>;
    /// The current value of another definition (a tag or segment as a bool).
    fn definition(&self, id: DefId) -> Value;
    /// The earliest instant after `now` at which aggregate `id`'s value could change by
    /// time alone: an event leaving its window or leaving retention, or an event stamped in
    /// the future entering it. Early is allowed (every change of the events it sees); an
    /// implementation may skip changes that cannot move the value (`last` and `since` read
    /// only the newest event, `first` only the oldest). Never late.
    fn aggregate_next_change(&self, id: AggId) -> Option<i64>;
    /// The earliest instant after `now` at which event tag `id` appears or expires.
    fn event_tag_next_change(&self, id: DefId) -> Option<i64>;
    /// The earliest instant after `now` at which aggregate `id`'s value (a number), moved
    /// by time alone, leaves `band` — or an earlier instant at which to ask again (never a
    /// later one); `None` if it never does. The default asks again at every change of the
    /// events it sees.
    fn aggregate_leaves(&self, id: AggId, band: &Band) -> Option<i64> {
        let _ = band;
        self.aggregate_next_change(id)
    }
    /// For a count aggregate whose events only leave from `now` on (no event stamped later
    /// waits to enter it): its value. `None` otherwise, or when the facts cannot say (then
    /// weighted sums of counts wake at every change of their events).
    fn falling_count(&self, id: AggId) -> Option<u64> {
        let _ = id;
        None
    }
    /// The instant at which the `k`-th (from 1, oldest first) of a falling count's events
    /// leaves it, for `1 <= k <=` what [`Facts::falling_count`] gave.
    fn count_exit(&self, id: AggId, k: u64) -> Option<i64> {
        let _ = (id, k);
        None
    }
}

/// The numbers an aggregate's value can take without changing any comparison a tag or
/// segment makes with it: between `low` and `high`, each bound inclusive or not.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Band {
    pub low: Option<(Decimal, bool)>,
    pub high: Option<(Decimal, bool)>,
}

impl Band {
    pub fn contains(&self, v: Decimal) -> bool {
        self.low
            .is_none_or(|(l, inclusive)| if inclusive { v >= l } else { v > l })
            && self
                .high
                .is_none_or(|(h, inclusive)| if inclusive { v <= h } else { v < h })
    }

    /// Narrows the band to values above `l` (or at it, when `inclusive`).
    pub(crate) fn above(&mut self, l: Decimal, inclusive: bool) {
        if self
            .low
            .is_none_or(|(cur, cur_inc)| l > cur || l == cur && cur_inc && !inclusive)
        {
            self.low = Some((l, inclusive));
        }
    }

    /// Narrows the band to values below `h` (or at it, when `inclusive`).
    pub(crate) fn below(&mut self, h: Decimal, inclusive: bool) {
        if self
            .high
            .is_none_or(|(cur, cur_inc)| h < cur || h == cur && cur_inc && !inclusive)
        {
            self.high = Some((h, inclusive));
        }
    }
}

/// Where a compiled expression reads its inputs.
pub(crate) trait Scope {
    fn aggregate(&self, id: AggId) -> Value;
    fn profile(&self, name: &str) -> Option<Value>;
    fn definition(&self, id: DefId) -> Value;
    fn prop(&self, path: &str) -> Value;
}

pub(crate) struct FactsScope<'f, F: ?Sized>(pub &'f F);

impl<F: Facts + ?Sized> Scope for FactsScope<'_, F> {
    fn aggregate(&self, id: AggId) -> Value {
        self.0.aggregate(id)
    }
    fn profile(&self, name: &str) -> Option<Value> {
        self.0.profile(name)
    }
    fn definition(&self, id: DefId) -> Value {
        self.0.definition(id)
    }
    fn prop(&self, _path: &str) -> Value {
        Value::Null
    }
}

/// The scope of a `where` predicate: one event's properties and the customer's profile.
pub(crate) struct EventScope<'e, P> {
    pub event: &'e Event,
    pub profile: P,
}

impl<P: Fn(&str) -> Option<Value>> Scope for EventScope<'_, P> {
    fn aggregate(&self, _id: AggId) -> Value {
        Value::Null
    }
    fn profile(&self, name: &str) -> Option<Value> {
        (self.profile)(name)
    }
    fn definition(&self, _id: DefId) -> Value {
        Value::Null
    }
    fn prop(&self, path: &str) -> Value {
        self.event.props.get(path)
    }
}

/// True when `filter` (a compiled `where`) holds on `event`.
pub fn filter_matches(filter: Option<&Node>, event: &Event, profile: impl Fn(&str) -> Option<Value>) -> bool {
    match filter {
        None => true,
        Some(node) => eval_node(node, &EventScope { event, profile }).is_true(),
    }
}

impl CompiledRules {
    /// Evaluates one definition. Event tags are state, not expressions: their value is
    /// whatever the facts say.
    pub fn evaluate<F: Facts + ?Sized>(&self, id: DefId, facts: &F) -> Value {
        let def = &self.defs[id];
        match (&def.expr, def.kind) {
            (_, DefKind::EventTag) | (None, _) => facts.definition(id),
            (Some(node), DefKind::Trait) => eval_node(node, &FactsScope(facts)),
            (Some(node), _) => Value::Bool(eval_node(node, &FactsScope(facts)).is_true()),
        }
    }

    /// Evaluates one expression of these rules (a part of a definition) on `facts`.
    pub fn evaluate_node<F: Facts + ?Sized>(&self, node: &Node, facts: &F) -> Value {
        eval_node(node, &FactsScope(facts))
    }

    /// Evaluates every definition in evaluation order; definitions read the values computed
    /// before them in the same pass, and event tags come from `facts`.
    pub fn evaluate_all<F: Facts + ?Sized>(&self, facts: &F) -> Vec<Value> {
        let mut values: Vec<Option<Value>> = vec![None; self.defs.len()];
        for &id in &self.order {
            let v = {
                let overlay = Overlay {
                    facts,
                    values: &values,
                };
                self.evaluate(id, &overlay)
            };
            values[id] = Some(v);
        }
        values.into_iter().map(Option::unwrap_or_default).collect()
    }
}

/// Facts whose definition values come from a pass in progress.
struct Overlay<'a, F: ?Sized> {
    facts: &'a F,
    values: &'a [Option<Value>],
}

impl<F: Facts + ?Sized> Facts for Overlay<'_, F> {
    fn now(&self) -> i64 {
        self.facts.now()
    }
    fn aggregate(&self, id: AggId) -> Value {
        self.facts.aggregate(id)
    }
    fn profile(&self, name: &str) -> Option<Value> {
        self.facts.profile(name)
    }
    fn definition(&self, id: DefId) -> Value {
        match &self.values[id] {
            Some(v) => v.clone(),
            None => self.facts.definition(id),
        }
    }
    fn aggregate_leaves(&self, id: AggId, band: &Band) -> Option<i64> {
        self.facts.aggregate_leaves(id, band)
    }
    fn falling_count(&self, id: AggId) -> Option<u64> {
        self.facts.falling_count(id)
    }
    fn count_exit(&self, id: AggId, k: u64) -> Option<i64> {
        self.facts.count_exit(id, k)
    }
    fn aggregate_next_change(&self, id: AggId) -> Option<i64> {
        self.facts.aggregate_next_change(id)
    }
    fn event_tag_next_change(&self, id: DefId) -> Option<i64> {
        self.facts.event_tag_next_change(id)
    }
}

pub(crate) fn eval_node<S: Scope + ?Sized>(node: &Node, scope: &S) -> Value {
    match node {
        Node::Const(v) => v.clone(),
        Node::List(items) => Value::List(items.iter().map(|n| eval_node(n, scope)).collect()),
        Node::Profile(name) => scope.profile(name).unwrap_or(Value::Null),
        Node::Has(name) => Value::Bool(scope.profile(name).is_some_and(|v| !v.is_null())),
        Node::Prop(path) => scope.prop(path),
        Node::Agg(id) => scope.aggregate(*id),
        Node::Def(id) => scope.definition(*id),
        Node::Not(inner) => Value::Bool(!eval_node(inner, scope).is_true()),
        Node::Neg(inner) => match eval_node(inner, scope) {
            Value::Num(n) => Value::Num(-n),
            Value::Dur(ms) => ms.checked_neg().map_or(Value::Null, Value::Dur),
            _ => Value::Null,
        },
        Node::Binary(BinaryOp::And, l, r) => {
            Value::Bool(eval_node(l, scope).is_true() && eval_node(r, scope).is_true())
        }
        Node::Binary(BinaryOp::Or, l, r) => {
            Value::Bool(eval_node(l, scope).is_true() || eval_node(r, scope).is_true())
        }
        Node::Binary(op, l, r) => apply_binary(*op, &eval_node(l, scope), &eval_node(r, scope)),
    }
}

/// The meaning of every binary operator but `and`/`or` on evaluated operands.
pub fn apply_binary(op: BinaryOp, a: &Value, b: &Value) -> Value {
    use std::cmp::Ordering::*;
    let ordered = |want: fn(std::cmp::Ordering) -> bool| Value::Bool(a.rule_cmp(b).is_some_and(want));
    match op {
        BinaryOp::Eq => Value::Bool(a.rule_eq(b)),
        BinaryOp::Ne => Value::Bool(a.rule_ne(b)),
        BinaryOp::Lt => ordered(|o| o == Less),
        BinaryOp::Le => ordered(|o| o != Greater),
        BinaryOp::Gt => ordered(|o| o == Greater),
        BinaryOp::Ge => ordered(|o| o != Less),
        BinaryOp::In => Value::Bool(match b {
            Value::List(items) => items.iter().any(|i| a.rule_eq(i)),
            _ => false,
        }),
        BinaryOp::Contains => Value::Bool(match (a, b) {
            (Value::Str(hay), Value::Str(needle)) => {
                crate::normalize::normalize(hay).contains(&*crate::normalize::normalize(needle))
            }
            (Value::List(items), needle) => items.iter().any(|i| i.rule_eq(needle)),
            _ => false,
        }),
        BinaryOp::StartsWith => Value::Bool(match (a, b) {
            (Value::Str(s), Value::Str(prefix)) => {
                crate::normalize::normalize(s).starts_with(&*crate::normalize::normalize(prefix))
            }
            _ => false,
        }),
        BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div => arithmetic(op, a, b),
        BinaryOp::And => Value::Bool(a.is_true() && b.is_true()),
        BinaryOp::Or => Value::Bool(a.is_true() || b.is_true()),
    }
}

fn arithmetic(op: BinaryOp, a: &Value, b: &Value) -> Value {
    use Value::{Dur, Num};
    let dur = |d: Option<Decimal>| {
        d.and_then(|d| i64::try_from(d.trunc()).ok())
            .map_or(Value::Null, Dur)
    };
    let num = |d: Option<Decimal>| d.map_or(Value::Null, Num);
    match (op, a, b) {
        (BinaryOp::Add, Num(x), Num(y)) => num(x.checked_add(*y)),
        (BinaryOp::Sub, Num(x), Num(y)) => num(x.checked_sub(*y)),
        (BinaryOp::Mul, Num(x), Num(y)) => num(x.checked_mul(*y)),
        (BinaryOp::Div, Num(x), Num(y)) => num(x.checked_div(*y)),
        (BinaryOp::Add, Dur(x), Dur(y)) => x.checked_add(*y).map_or(Value::Null, Dur),
        (BinaryOp::Sub, Dur(x), Dur(y)) => x.checked_sub(*y).map_or(Value::Null, Dur),
        (BinaryOp::Mul, Dur(x), Num(y)) | (BinaryOp::Mul, Num(y), Dur(x)) => {
            dur(Decimal::from(*x).checked_mul(*y))
        }
        (BinaryOp::Div, Dur(x), Num(y)) => dur(Decimal::from(*x).checked_div(*y)),
        (BinaryOp::Div, Dur(x), Dur(y)) => num(Decimal::from(*x).checked_div(Decimal::from(*y))),
        _ => Value::Null,
    }
}
