//! When can a customer's values change with no new event? Windows slide, ttls expire, and
//! `since(...)` crosses thresholds. [`CompiledRules::next_change`] finds the earliest such
//! instant so the engine can set one timer per customer. It may be early (the engine then
//! re-evaluates, finds nothing and asks again) but never late.

use rust_decimal::prelude::*;

use crate::ast::AggFunc;
use crate::ast::BinaryOp;
use crate::compile::{AggId, CompiledRules, DefId, DefKind, Node};
use crate::eval::{eval_node, Band, Facts, FactsScope, Scope};
use crate::value::Value;

/// A value that is linear in `now`: `slope * now + offset`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Linear {
    slope: Decimal,
    offset: Decimal,
}

impl Linear {
    fn constant(v: Decimal) -> Linear {
        Linear {
            slope: Decimal::ZERO,
            offset: v,
        }
    }
}

impl CompiledRules {
    /// The earliest instant after `facts.now()` at which any definition's value could
    /// change by time alone, or `None` if none can.
    pub fn next_change<F: Facts + ?Sized>(&self, facts: &F) -> Option<i64> {
        self.next_change_where(facts, |_| true, |_| true)
    }

    /// The earliest instant after `facts.now()` at which a tag or segment could change by
    /// time alone: [`CompiledRules::next_change`] without the aggregates and `since`
    /// crossings only traits no tag or segment reads depend on. The engine's timers.
    /// An aggregate that tags and segments only compare with numbers counts as changed
    /// when one of those comparisons would turn: not at every event leaving its window.
    pub fn next_membership_change<F: Facts + ?Sized>(&self, facts: &F) -> Option<i64> {
        let now = facts.now();
        let (defs, aggs) = &self.membership_reads;
        let mut next =
            self.next_change_where(facts, |a| aggs[a] && self.thresholds[a].is_none(), |d| defs[d]);
        for (id, thresholds) in self.thresholds.iter().enumerate() {
            let Some(thresholds) = thresholds.as_deref().filter(|_| aggs[id]) else {
                continue;
            };
            let Value::Num(current) = facts.aggregate(id) else {
                next = [next, facts.aggregate_next_change(id).filter(|t| *t > now)]
                    .into_iter()
                    .flatten()
                    .min();
                continue;
            };
            let mut band = Band::default();
            for t in thresholds {
                t.narrow(current, &mut band);
            }
            if let Some(t) = facts.aggregate_leaves(id, &band).filter(|t| *t > now) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        next
    }

    /// Like [`CompiledRules::next_change`], restricted to the aggregates and definitions
    /// the filters accept (for example those one definition reads).
    pub(crate) fn next_change_where<F: Facts + ?Sized>(
        &self,
        facts: &F,
        agg_wanted: impl Fn(AggId) -> bool,
        def_wanted: impl Fn(DefId) -> bool,
    ) -> Option<i64> {
        let now = facts.now();
        let mut next: Option<i64> = None;
        let mut consider = |t: Option<i64>| {
            if let Some(t) = t.filter(|t| *t > now) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        for id in (0..self.aggregates.len()).filter(|id| agg_wanted(*id)) {
            consider(facts.aggregate_next_change(id));
        }
        for def in &self.defs {
            if def.kind == DefKind::EventTag && def_wanted(def.id) {
                consider(facts.event_tag_next_change(def.id));
            }
        }
        for (def, op, lhs, rhs) in &self.time_comparisons {
            if def_wanted(*def) {
                consider(self.crossing(*op, lhs, rhs, facts));
            }
        }
        next
    }

    /// The first instant after now at which `lhs op rhs` changes truth, when both sides are
    /// linear in `now`.
    fn crossing<F: Facts + ?Sized>(&self, op: BinaryOp, lhs: &Node, rhs: &Node, facts: &F) -> Option<i64> {
        let now = facts.now();
        let l = self.linear(lhs, facts)?;
        let r = self.linear(rhs, facts)?;
        let diff = Linear {
            slope: l.slope.checked_sub(r.slope)?,
            offset: l.offset.checked_sub(r.offset)?,
        };
        if diff.slope.is_zero() {
            return None;
        }
        let root = (-diff.offset).checked_div(diff.slope)?;
        let floor = root.floor().to_i64()?;
        // The linear model only locates the root (its decimal division may round); each
        // candidate instant is confirmed by exact evaluation at that instant.
        let current = self.compare_at(op, lhs, rhs, facts, 0);
        let candidates = (-2..=2).filter_map(|k| floor.checked_add(k)).filter(|t| *t > now);
        let mut last = None;
        for t in candidates {
            if self.compare_at(op, lhs, rhs, facts, t - now) != current {
                return Some(t);
            }
            last = Some(t);
        }
        // The model puts the root ahead but the exact check did not confirm it nearby: wake
        // up at the last candidate and look again (early, never late).
        last.filter(|_| floor >= now)
    }

    /// `lhs op rhs` evaluated `delta` ms after `now`, as if no event arrived meanwhile.
    fn compare_at<F: Facts + ?Sized>(
        &self,
        op: BinaryOp,
        lhs: &Node,
        rhs: &Node,
        facts: &F,
        delta: i64,
    ) -> bool {
        let scope = Shifted {
            rules: self,
            facts,
            delta,
        };
        crate::eval::apply_binary(op, &eval_node(lhs, &scope), &eval_node(rhs, &scope)).is_true()
    }

    /// True when `expr`, linear in `now`, has a non-zero slope at these facts (a `since`
    /// that is set, not cancelled out).
    pub(crate) fn grows_with_time<F: Facts + ?Sized>(&self, expr: &Node, facts: &F) -> bool {
        self.linear(expr, facts).is_some_and(|l| !l.slope.is_zero())
    }

    /// The value of a numeric or duration expression as a linear function of `now`.
    fn linear<F: Facts + ?Sized>(&self, node: &Node, facts: &F) -> Option<Linear> {
        let now = facts.now();
        let constant = |v: Value| match v {
            Value::Num(n) => Some(Linear::constant(n)),
            Value::Dur(ms) => Some(Linear::constant(Decimal::from(ms))),
            _ => None,
        };
        match node {
            Node::Agg(id) if self.aggregates[*id].func == AggFunc::Since => match facts.aggregate(*id) {
                // since = now - last_ts
                Value::Dur(ms) => Some(Linear {
                    slope: Decimal::ONE,
                    offset: Decimal::from(ms) - Decimal::from(now),
                }),
                _ => None,
            },
            Node::Def(id) => {
                let def = &self.defs[*id];
                match (&def.expr, def.kind, def.uses_since) {
                    (Some(expr), DefKind::Trait, true) => self.linear(expr, facts),
                    _ => constant(facts.definition(*id)),
                }
            }
            Node::Neg(inner) => {
                let v = self.linear(inner, facts)?;
                Some(Linear {
                    slope: -v.slope,
                    offset: -v.offset,
                })
            }
            Node::Binary(op @ (BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div), l, r) => {
                let a = self.linear(l, facts)?;
                let b = self.linear(r, facts)?;
                match op {
                    BinaryOp::Add => Some(Linear {
                        slope: a.slope.checked_add(b.slope)?,
                        offset: a.offset.checked_add(b.offset)?,
                    }),
                    BinaryOp::Sub => Some(Linear {
                        slope: a.slope.checked_sub(b.slope)?,
                        offset: a.offset.checked_sub(b.offset)?,
                    }),
                    BinaryOp::Mul if a.slope.is_zero() => Some(Linear {
                        slope: b.slope.checked_mul(a.offset)?,
                        offset: b.offset.checked_mul(a.offset)?,
                    }),
                    BinaryOp::Mul if b.slope.is_zero() => Some(Linear {
                        slope: a.slope.checked_mul(b.offset)?,
                        offset: a.offset.checked_mul(b.offset)?,
                    }),
                    BinaryOp::Div if b.slope.is_zero() && !b.offset.is_zero() => Some(Linear {
                        slope: a.slope.checked_div(b.offset)?,
                        offset: a.offset.checked_div(b.offset)?,
                    }),
                    _ => None,
                }
            }
            other => constant(eval_node(other, &FactsScope(facts))),
        }
    }
}

/// The facts `delta` ms later: `since` values grow by `delta`, and traits built on them are
/// recomputed; everything else is as at `now`.
struct Shifted<'a, F: ?Sized> {
    rules: &'a CompiledRules,
    facts: &'a F,
    delta: i64,
}

impl<F: Facts + ?Sized> Scope for Shifted<'_, F> {
    fn aggregate(&self, id: usize) -> Value {
        match (self.rules.aggregates[id].func, self.facts.aggregate(id)) {
            (AggFunc::Since, Value::Dur(ms)) => Value::Dur(ms.saturating_add(self.delta)),
            (_, v) => v,
        }
    }
    fn profile(&self, name: &str) -> Option<Value> {
        self.facts.profile(name)
    }
    fn definition(&self, id: usize) -> Value {
        let def = &self.rules.defs[id];
        match (&def.expr, def.kind, def.uses_since) {
            (Some(expr), DefKind::Trait, true) => eval_node(expr, self),
            _ => self.facts.definition(id),
        }
    }
    fn prop(&self, _path: &str) -> Value {
        Value::Null
    }
}

/// `aggregate op value`: how a tag or segment reads a count or sum it only compares with a
/// number (`value op aggregate` is stored turned around).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Threshold {
    op: BinaryOp,
    value: Decimal,
}

impl Threshold {
    /// Narrows `band` to the values on the same side of this comparison as `current`.
    fn narrow(&self, current: Decimal, band: &mut Band) {
        let c = self.value;
        match self.op {
            BinaryOp::Gt | BinaryOp::Le if current > c => band.above(c, false),
            BinaryOp::Gt | BinaryOp::Le => band.below(c, true),
            BinaryOp::Ge | BinaryOp::Lt if current >= c => band.above(c, true),
            BinaryOp::Ge | BinaryOp::Lt => band.below(c, false),
            // `==` and `!=` turn when the value reaches or leaves `c`.
            _ if current == c => {
                band.above(c, true);
                band.below(c, true);
            }
            _ if current < c => band.below(c, false),
            _ => band.above(c, false),
        }
    }
}

/// For each count and sum aggregate that tags and segments read only through comparisons
/// with numbers (directly or through a trait that is just that aggregate), those
/// comparisons; `None` for every other aggregate.
pub(crate) fn membership_thresholds(rules: &CompiledRules) -> Vec<Option<Vec<Threshold>>> {
    let alias = |d: DefId| match (&rules.defs[d].expr, rules.defs[d].kind) {
        (Some(Node::Agg(a)), DefKind::Trait) => Some(*a),
        _ => None,
    };
    let mut out: Vec<Option<Vec<Threshold>>> = rules
        .aggregates
        .iter()
        .map(|a| matches!(a.func, AggFunc::Count | AggFunc::Sum).then(Vec::new))
        .collect();
    fn visit(node: &Node, alias: &dyn Fn(DefId) -> Option<usize>, out: &mut [Option<Vec<Threshold>>]) {
        let agg_of = |n: &Node| match n {
            Node::Agg(a) => Some(*a),
            Node::Def(d) => alias(*d),
            _ => None,
        };
        match node {
            Node::Binary(
                op
                @ (BinaryOp::Eq | BinaryOp::Ne | BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge),
                l,
                r,
            ) => match (agg_of(l), &**l, agg_of(r), &**r) {
                (Some(a), _, _, Node::Const(Value::Num(value))) => push(out, a, *op, *value),
                (_, Node::Const(Value::Num(value)), Some(a), _) => {
                    // `value op aggregate` is `aggregate op' value`.
                    let turned = match op {
                        BinaryOp::Lt => BinaryOp::Gt,
                        BinaryOp::Le => BinaryOp::Ge,
                        BinaryOp::Gt => BinaryOp::Lt,
                        BinaryOp::Ge => BinaryOp::Le,
                        other => *other,
                    };
                    push(out, a, turned, *value)
                }
                _ => {
                    visit(l, alias, out);
                    visit(r, alias, out);
                }
            },
            Node::Agg(_) | Node::Def(_) => {
                if let Some(a) = agg_of(node) {
                    out[a] = None;
                }
            }
            Node::Not(inner) | Node::Neg(inner) => visit(inner, alias, out),
            Node::Binary(_, l, r) => {
                visit(l, alias, out);
                visit(r, alias, out);
            }
            Node::List(items) => items.iter().for_each(|i| visit(i, alias, out)),
            Node::Const(_) | Node::Profile(_) | Node::Has(_) | Node::Prop(_) => {}
        }
    }
    fn push(out: &mut [Option<Vec<Threshold>>], a: usize, op: BinaryOp, value: Decimal) {
        if let Some(list) = &mut out[a] {
            list.push(Threshold { op, value });
        }
    }
    let (defs, _) = &rules.membership_reads;
    for def in rules.defs.iter().filter(|d| defs[d.id] && alias(d.id).is_none()) {
        if let Some(expr) = &def.expr {
            visit(expr, &alias, &mut out);
        }
    }
    out
}
