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
            // (An empty list: read only through weighted sums, judged below.)
            let Some(thresholds) = thresholds.as_deref().filter(|t| aggs[id] && !t.is_empty()) else {
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
        for combination in &self.combinations {
            if let Some(t) = combination.leaves(facts, next).filter(|t| *t > now) {
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

/// `offset + Σ weight × count`, every weight of one sign, compared with numbers by tags
/// and segments (`engagement >= 10` where `engagement = count(a, 30d) + 5 * count(b, 30d)`).
/// While its counts only fall, its value moves one way only, so it leaves the band of
/// values that keep every comparison as it is at most once, and that instant is found
/// exactly by bisection over its counts' exit instants rather than by waking at each
/// event leaving.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Combination {
    terms: Vec<(AggId, Decimal)>,
    offset: Decimal,
    thresholds: Vec<Threshold>,
}

impl Combination {
    /// The first instant after now at which the sum leaves the band its comparisons keep
    /// it in, if that is before `before` (a wake-up already set: finding a later instant
    /// would be wasted work, and this runs at every judgement); `None` otherwise. When a
    /// count may still rise (an event stamped later waits to enter it) or the facts cannot
    /// list exits, the earliest change of any of its counts instead (early, never late).
    fn leaves<F: Facts + ?Sized>(&self, facts: &F, before: Option<i64>) -> Option<i64> {
        let now = facts.now();
        self.falling_leaves(facts, now, before.unwrap_or(i64::MAX))
            .unwrap_or_else(|| {
                self.terms
                    .iter()
                    .filter_map(|(a, _)| facts.aggregate_next_change(*a))
                    .filter(|t| *t > now)
                    .min()
            })
    }

    /// `Some(answer)` when every count only falls from now on; `None` to fall back.
    fn falling_leaves<F: Facts + ?Sized>(&self, facts: &F, now: i64, before: i64) -> Option<Option<i64>> {
        let mut current = self.offset;
        for (a, weight) in &self.terms {
            let count = facts.falling_count(*a)?;
            current = current.checked_add(weight.checked_mul(Decimal::from(count))?)?;
        }
        let mut band = Band::default();
        for t in &self.thresholds {
            t.narrow(current, &mut band);
        }
        // With every count falling the sum moves one way, towards `offset` (its value once
        // every event has left): it leaves the band on the way, or never.
        let rises = self
            .terms
            .iter()
            .any(|(_, w)| w.is_sign_negative() && !w.is_zero());
        let bound = if rises { band.high } else { band.low };
        if bound.is_none() || band.contains(self.offset) || before <= now.saturating_add(1) {
            return Some(None);
        }
        // Per term: its weight, count, and how many of its events have left by `inside` and
        // by `outside` (the instants between which the sum leaves the band).
        let mut terms = Vec::with_capacity(self.terms.len());
        let (mut first_exit, mut last_exit) = (i64::MAX, now);
        for (a, weight) in &self.terms {
            let count = facts.falling_count(*a)?;
            if count > 0 {
                first_exit = first_exit.min(facts.count_exit(*a, 1)?);
                last_exit = last_exit.max(facts.count_exit(*a, count)?);
            }
            terms.push(Term {
                agg: *a,
                weight: *weight,
                count,
                by_inside: 0,
                by_outside: count,
                by_mid: 0,
            });
        }
        // The sum holds until the first exit; every event has left at the last one.
        let (mut inside, mut outside) = (first_exit.saturating_sub(1).max(now), last_exit);
        if before <= inside.saturating_add(1) {
            return Some(None);
        }
        // Only an instant before `before` is wanted: is the sum still inside just before it?
        let mut mid = before - 1;
        while outside - inside > 1 {
            if mid <= inside || mid >= outside {
                // Split at the middle one of the exits the widest term has in between (so
                // each step halves the candidates), or at the middle instant if that is not
                // strictly between.
                let widest = terms.iter().max_by_key(|t| t.by_outside - t.by_inside)?;
                mid = inside + (outside - inside) / 2;
                if widest.by_outside > widest.by_inside {
                    let middle = widest.by_inside + (widest.by_outside - widest.by_inside).div_ceil(2);
                    let exit = facts.count_exit(widest.agg, middle)?;
                    if exit > inside && exit < outside {
                        mid = exit;
                    }
                }
            }
            let mut value = self.offset;
            for t in &mut terms {
                // Exits are in time order: those by `mid` are a prefix.
                let (mut gone, mut stays) = (t.by_inside, t.by_outside);
                while gone < stays {
                    let k = gone + (stays - gone) / 2;
                    if facts.count_exit(t.agg, k + 1)? <= mid {
                        gone = k + 1;
                    } else {
                        stays = k;
                    }
                }
                t.by_mid = gone;
                value = value.checked_add(t.weight.checked_mul(Decimal::from(t.count - gone))?)?;
            }
            if band.contains(value) {
                if mid >= before - 1 {
                    return Some(None);
                }
                inside = mid;
                terms.iter_mut().for_each(|t| t.by_inside = t.by_mid);
            } else {
                outside = mid;
                terms.iter_mut().for_each(|t| t.by_outside = t.by_mid);
            }
        }
        Some((outside > now && outside < before).then_some(outside))
    }
}

/// One count of a [`Combination`] while its crossing is searched for.
struct Term {
    agg: AggId,
    weight: Decimal,
    count: u64,
    by_inside: u64,
    by_outside: u64,
    by_mid: u64,
}

/// A numeric expression as `offset + Σ weight × aggregate`, through traits; `None` when it
/// is not that shape (or the arithmetic overflows).
fn linear_form(rules: &CompiledRules, node: &Node) -> Option<(Vec<(AggId, Decimal)>, Decimal)> {
    let scaled = |(terms, offset): (Vec<(AggId, Decimal)>, Decimal), k: Decimal| {
        let terms = terms
            .into_iter()
            .map(|(a, w)| Some((a, w.checked_mul(k)?)))
            .collect::<Option<Vec<_>>>()?;
        Some((terms, offset.checked_mul(k)?))
    };
    match node {
        Node::Const(Value::Num(v)) => Some((Vec::new(), *v)),
        Node::Agg(a) if matches!(rules.aggregates[*a].func, AggFunc::Count | AggFunc::Sum) => {
            Some((vec![(*a, Decimal::ONE)], Decimal::ZERO))
        }
        Node::Def(d) => match (&rules.defs[*d].expr, rules.defs[*d].kind) {
            (Some(expr), DefKind::Trait) => linear_form(rules, expr),
            _ => None,
        },
        Node::Neg(inner) => scaled(linear_form(rules, inner)?, -Decimal::ONE),
        Node::Binary(op @ (BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul), l, r) => {
            let (a, b) = (linear_form(rules, l)?, linear_form(rules, r)?);
            match op {
                BinaryOp::Mul if a.0.is_empty() => scaled(b, a.1),
                BinaryOp::Mul if b.0.is_empty() => scaled(a, b.1),
                BinaryOp::Mul => None,
                _ => {
                    let b = if *op == BinaryOp::Sub {
                        scaled(b, -Decimal::ONE)?
                    } else {
                        b
                    };
                    let mut terms = a.0;
                    for (agg, w) in b.0 {
                        match terms.iter_mut().find(|(x, _)| *x == agg) {
                            Some((_, v)) => *v = v.checked_add(w)?,
                            None => terms.push((agg, w)),
                        }
                    }
                    terms.retain(|(_, w)| !w.is_zero());
                    Some((terms, a.1.checked_add(b.1)?))
                }
            }
        }
        _ => None,
    }
}

/// A [`linear_form`] of counts only, with weights of one sign: a [`Combination`]'s shape.
fn monotone_counts(rules: &CompiledRules, node: &Node) -> Option<(Vec<(AggId, Decimal)>, Decimal)> {
    let (terms, offset) = linear_form(rules, node)?;
    let counts = terms
        .iter()
        .all(|(a, _)| rules.aggregates[*a].func == AggFunc::Count);
    let one_sign =
        terms.iter().all(|(_, w)| w.is_sign_positive()) || terms.iter().all(|(_, w)| w.is_sign_negative());
    (counts && one_sign && !terms.is_empty()).then_some((terms, offset))
}

/// For each count and sum aggregate that tags and segments read only through comparisons
/// with numbers (directly, through a trait that is just that aggregate, or inside a
/// weighted sum of counts compared with a number), those direct comparisons; `None` for
/// every other aggregate. And the weighted sums of counts with their comparisons.
pub(crate) fn membership_thresholds(
    rules: &CompiledRules,
) -> (Vec<Option<Vec<Threshold>>>, Vec<Combination>) {
    struct Visit<'r> {
        rules: &'r CompiledRules,
        out: Vec<Option<Vec<Threshold>>>,
        combinations: Vec<Combination>,
    }
    impl Visit<'_> {
        /// The aggregate a node is, directly or through a trait that is just it.
        fn agg_of(&self, n: &Node) -> Option<AggId> {
            match n {
                Node::Agg(a) => Some(*a),
                Node::Def(d) => alias(self.rules, *d),
                _ => None,
            }
        }

        fn node(&mut self, node: &Node) {
            match node {
                Node::Binary(
                    op @ (BinaryOp::Eq
                    | BinaryOp::Ne
                    | BinaryOp::Lt
                    | BinaryOp::Le
                    | BinaryOp::Gt
                    | BinaryOp::Ge),
                    l,
                    r,
                ) => {
                    // `value op x` is `x op' value`.
                    let (x, value, op) = match (&**l, &**r) {
                        (x, Node::Const(Value::Num(v))) => (x, *v, *op),
                        (Node::Const(Value::Num(v)), x) => (x, *v, turned(*op)),
                        _ => {
                            self.node(l);
                            self.node(r);
                            return;
                        }
                    };
                    if let Some(a) = self.agg_of(x) {
                        if let Some(list) = &mut self.out[a] {
                            list.push(Threshold { op, value });
                        }
                    } else if let Some((terms, offset)) = monotone_counts(self.rules, x) {
                        let threshold = Threshold { op, value };
                        match self
                            .combinations
                            .iter_mut()
                            .find(|c| c.terms == terms && c.offset == offset)
                        {
                            Some(c) => c.thresholds.push(threshold),
                            None => self.combinations.push(Combination {
                                terms,
                                offset,
                                thresholds: vec![threshold],
                            }),
                        }
                    } else {
                        self.node(x);
                    }
                }
                Node::Agg(_) | Node::Def(_) => {
                    if let Some(a) = self.agg_of(node) {
                        self.out[a] = None;
                    } else if let Some((terms, _)) = monotone_counts(self.rules, node) {
                        // A weighted sum of counts read some other way: each count wakes
                        // its readers at every change.
                        for (a, _) in terms {
                            self.out[a] = None;
                        }
                    }
                }
                Node::Not(inner) | Node::Neg(inner) => self.node(inner),
                Node::Binary(_, l, r) => {
                    self.node(l);
                    self.node(r);
                }
                Node::List(items) => items.iter().for_each(|i| self.node(i)),
                Node::Const(_) | Node::Profile(_) | Node::Has(_) | Node::Prop(_) => {}
            }
        }
    }
    fn alias(rules: &CompiledRules, d: DefId) -> Option<AggId> {
        match (&rules.defs[d].expr, rules.defs[d].kind) {
            (Some(Node::Agg(a)), DefKind::Trait) => Some(*a),
            _ => None,
        }
    }
    fn turned(op: BinaryOp) -> BinaryOp {
        match op {
            BinaryOp::Lt => BinaryOp::Gt,
            BinaryOp::Le => BinaryOp::Ge,
            BinaryOp::Gt => BinaryOp::Lt,
            BinaryOp::Ge => BinaryOp::Le,
            other => other,
        }
    }
    let mut visit = Visit {
        rules,
        out: rules
            .aggregates
            .iter()
            .map(|a| matches!(a.func, AggFunc::Count | AggFunc::Sum).then(Vec::new))
            .collect(),
        combinations: Vec::new(),
    };
    let (defs, _) = &rules.membership_reads;
    // Traits that are an aggregate or a weighted sum of counts are judged where they are
    // read: through a comparison with a number, or otherwise.
    let read_where_used = |d: DefId| {
        rules.defs[d].kind == DefKind::Trait
            && (alias(rules, d).is_some() || monotone_counts(rules, &Node::Def(d)).is_some())
    };
    for def in rules.defs.iter().filter(|d| defs[d.id] && !read_where_used(d.id)) {
        if let Some(expr) = &def.expr {
            visit.node(expr);
        }
    }
    (visit.out, visit.combinations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Counts given by their exit instants (sorted), at `now`.
    struct Exits {
        now: i64,
        exits: Vec<Vec<i64>>,
    }

    impl Facts for Exits {
        fn now(&self) -> i64 {
            self.now
        }
        fn aggregate(&self, id: AggId) -> Value {
            Value::Num(Decimal::from(self.exits[id].len()))
        }
        fn profile(&self, _: &str) -> Option<Value> {
            None
        }
        fn definition(&self, _: DefId) -> Value {
            Value::Null
        }
        fn aggregate_next_change(&self, id: AggId) -> Option<i64> {
            self.exits[id].first().copied()
        }
        fn event_tag_next_change(&self, _: DefId) -> Option<i64> {
            None
        }
        fn falling_count(&self, id: AggId) -> Option<u64> {
            Some(self.exits[id].len() as u64)
        }
        fn count_exit(&self, id: AggId, k: u64) -> Option<i64> {
            Some(self.exits[id][k as usize - 1])
        }
    }

    fn op() -> impl Strategy<Value = BinaryOp> {
        prop::sample::select(vec![
            BinaryOp::Eq,
            BinaryOp::Ne,
            BinaryOp::Lt,
            BinaryOp::Le,
            BinaryOp::Gt,
            BinaryOp::Ge,
        ])
    }

    proptest! {
        /// The crossing found by bisection is the first exit instant at which the sum
        /// leaves the band its comparisons keep it in, found by trying every exit in order;
        /// so never after the first instant a comparison turns (early only where the sum
        /// jumps over a `==` or `!=` value).
        #[test]
        fn a_combination_leaves_at_the_first_instant_a_comparison_turns(
            exits in prop::collection::vec(prop::collection::vec(1i64..400, 0..60), 1..4),
            weights in prop::collection::vec(1i64..6, 4),
            negative in any::<bool>(),
            offset in -20i64..20,
            thresholds in prop::collection::vec((op(), -40i64..200), 1..4),
            before in 0i64..420,
        ) {
            let sign = if negative { -1 } else { 1 };
            let facts = Exits {
                now: 0,
                exits: exits.into_iter().map(|mut e| { e.sort_unstable(); e }).collect(),
            };
            let combination = Combination {
                terms: (0..facts.exits.len()).map(|a| (a, Decimal::from(sign * weights[a]))).collect(),
                offset: Decimal::from(offset),
                thresholds: thresholds
                    .iter()
                    .map(|(op, v)| Threshold { op: *op, value: Decimal::from(*v) })
                    .collect(),
            };
            let value_at = |t: i64| {
                combination.offset
                    + combination
                        .terms
                        .iter()
                        .map(|(a, w)| *w * Decimal::from(facts.exits[*a].iter().filter(|e| **e > t).count()))
                        .sum::<Decimal>()
            };
            let truths = |v: Decimal| {
                combination
                    .thresholds
                    .iter()
                    .map(|th| crate::eval::apply_binary(th.op, &Value::Num(v), &Value::Num(th.value)).is_true())
                    .collect::<Vec<_>>()
            };
            let mut band = Band::default();
            for th in &combination.thresholds {
                th.narrow(value_at(0), &mut band);
            }
            let start = truths(value_at(0));
            let mut instants: Vec<i64> = facts.exits.iter().flatten().copied().collect();
            instants.sort_unstable();
            let leaves = instants.iter().copied().find(|t| !band.contains(value_at(*t)));
            let found = combination.leaves(&facts, None);
            prop_assert_eq!(found, leaves);
            // Asked for a crossing before an instant: that one if earlier, else none.
            let found_before = combination.leaves(&facts, Some(before));
            prop_assert_eq!(found_before, leaves.filter(|t| *t < before));
            if let Some(turns) = instants.into_iter().find(|t| truths(value_at(*t)) != start) {
                prop_assert!(found.is_some_and(|f| f <= turns), "late: {found:?} after {turns}");
            }
        }
    }
}
