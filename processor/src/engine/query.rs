//! Segments read through the membership index: ad-hoc queries and member pages, on the
//! caller's thread.
//!
//! A query is compiled as a segment appended to the current rules, then planned over the
//! bitmaps: references to tags and segments are their member sets, and `and`, `or` and
//! `not` over them are set operations, exact. Anything else (a trait, a profile attribute,
//! an aggregate, a comparison) cannot be answered by the bitmaps; the plan then keeps the
//! narrowest candidate set the exact parts allow (`vip and ltv > 100` only looks at `vip`'s
//! members) and evaluates the whole expression on each candidate: on the index itself —
//! memberships from the bitmaps, profile attributes from the columns — when the expression
//! reads no events and only columnar attributes, else on the candidate's stored state (the
//! record alone when it reads no events, the record and retained events when it reads
//! aggregates).

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::sync::Arc;

use roaring::RoaringBitmap;
use rules::ast::BinaryOp;
use rules::{AggId, CompiledRules, DefId, DefKind, Facts, Node, Type, Value};

use super::{EngineError, ExportField, MembersPage, PartitionsPage, QueryError, QueryPage, ReadHandle};
use crate::columns::{TraitCache, TraitValue, ValueMap};
use crate::index::{IdPage, IndexState};
use crate::state::{CustomerState, EngineFacts};

/// What [`ReadHandle::filter_cached`] needs to know of the traits that read events.
struct CachedTraits<'a> {
    /// The published rules the query extends: the trait cache's key.
    base: &'a Arc<CompiledRules>,
    /// Per definition, whether it is a trait that reads events.
    event_traits: &'a [bool],
    /// Those the query uses.
    used: &'a [DefId],
}

/// The name the query is compiled under.
const QUERY_NAME: &str = "__tagstream_query";

/// What the bitmaps say about an expression: the customers it may hold for (the complement
/// of `set` when `negated`, kept lazy so `a and not b` is one difference, not a complement
/// of ten million customers and an intersection), and whether that is exactly the answer.
/// Sets of tags are borrowed from the index until an operation makes a new one.
struct Candidates<'a> {
    set: Cow<'a, RoaringBitmap>,
    negated: bool,
    exact: bool,
}

impl<'a> Candidates<'a> {
    fn exact(set: Cow<'a, RoaringBitmap>, negated: bool) -> Self {
        Candidates {
            set,
            negated,
            exact: true,
        }
    }

    /// The candidates as a plain set.
    fn materialise(self, index: &IndexState) -> RoaringBitmap {
        if self.negated {
            index.all() - self.set.as_ref()
        } else {
            self.set.into_owned()
        }
    }
}

fn plan<'a>(node: &Node, rules: &CompiledRules, index: &'a IndexState) -> Candidates<'a> {
    let everyone = || Candidates {
        set: Cow::Owned(RoaringBitmap::new()),
        negated: true,
        exact: false,
    };
    match node {
        Node::Const(Value::Bool(b)) => Candidates::exact(Cow::Owned(RoaringBitmap::new()), *b),
        Node::Def(id) if rules.def(*id).kind.has_members() => {
            let set = index
                .set(&rules.def(*id).name)
                .map_or_else(|| Cow::Owned(RoaringBitmap::new()), Cow::Borrowed);
            Candidates::exact(set, false)
        }
        Node::Not(inner) => {
            let inner = plan(inner, rules, index);
            if inner.exact {
                Candidates::exact(inner.set, !inner.negated)
            } else {
                everyone()
            }
        }
        Node::Binary(op @ (BinaryOp::And | BinaryOp::Or), a, b) => {
            let (a, b) = (plan(a, rules, index), plan(b, rules, index));
            let exact = a.exact && b.exact;
            // De Morgan keeps every case to one operation on the two sets, done in place on
            // a set an earlier operation made.
            let (set, negated) = match (op, a.negated, b.negated) {
                (BinaryOp::And, false, false) => (and(a.set, b.set), false),
                (BinaryOp::And, false, true) => (minus(a.set, &b.set), false),
                (BinaryOp::And, true, false) => (minus(b.set, &a.set), false),
                (BinaryOp::And, true, true) => (or(a.set, b.set), true),
                (_, false, false) => (or(a.set, b.set), false),
                (_, false, true) => (minus(b.set, &a.set), true),
                (_, true, false) => (minus(a.set, &b.set), true),
                (_, true, true) => (and(a.set, b.set), true),
            };
            Candidates {
                set: Cow::Owned(set),
                negated,
                exact,
            }
        }
        _ => everyone(),
    }
}

fn and(a: Cow<'_, RoaringBitmap>, b: Cow<'_, RoaringBitmap>) -> RoaringBitmap {
    match (a, b) {
        (Cow::Owned(x), y) | (y, Cow::Owned(x)) => x & y.as_ref(),
        (Cow::Borrowed(x), Cow::Borrowed(y)) => x & y,
    }
}

fn or(a: Cow<'_, RoaringBitmap>, b: Cow<'_, RoaringBitmap>) -> RoaringBitmap {
    match (a, b) {
        (Cow::Owned(x), y) | (y, Cow::Owned(x)) => x | y.as_ref(),
        (Cow::Borrowed(x), Cow::Borrowed(y)) => x | y,
    }
}

fn minus(a: Cow<'_, RoaringBitmap>, b: &RoaringBitmap) -> RoaringBitmap {
    match a {
        Cow::Owned(x) => x - b,
        Cow::Borrowed(x) => x - b,
    }
}

/// Whether evaluating `node` needs the customer's events (aggregates, directly or through a
/// trait); tags and segments are read from the record's memberships.
fn needs_events(node: &Node, rules: &CompiledRules) -> bool {
    match node {
        Node::Agg(_) => true,
        Node::Def(id) => {
            let def = rules.def(*id);
            !def.kind.has_members() && def.expr.as_ref().is_some_and(|e| needs_events(e, rules))
        }
        Node::List(items) => items.iter().any(|n| needs_events(n, rules)),
        Node::Not(n) | Node::Neg(n) => needs_events(n, rules),
        Node::Binary(_, a, b) => needs_events(a, rules) || needs_events(b, rules),
        Node::Const(_) | Node::Profile(_) | Node::Has(_) | Node::Prop(_) => false,
    }
}

/// The profile attributes `node` reads, directly or through the definitions it uses (tags
/// and segments excepted: their members come from the bitmaps).
fn profile_reads(node: &Node, rules: &CompiledRules, out: &mut Vec<Arc<str>>) {
    match node {
        Node::Profile(name) | Node::Has(name) => out.push(name.clone()),
        Node::Def(id) => {
            let def = rules.def(*id);
            if let (false, Some(expr)) = (def.kind.has_members(), &def.expr) {
                profile_reads(expr, rules, out);
            }
        }
        Node::List(items) => items.iter().for_each(|n| profile_reads(n, rules, out)),
        Node::Not(n) | Node::Neg(n) => profile_reads(n, rules, out),
        Node::Binary(_, a, b) => {
            profile_reads(a, rules, out);
            profile_reads(b, rules, out);
        }
        Node::Const(_) | Node::Prop(_) | Node::Agg(_) => {}
    }
}

/// Whether `plan` answers `node` exactly: boolean logic over tags and segments.
fn is_exact(node: &Node, rules: &CompiledRules) -> bool {
    match node {
        Node::Const(Value::Bool(_)) => true,
        Node::Def(id) => rules.def(*id).kind.has_members(),
        Node::Not(inner) => is_exact(inner, rules),
        Node::Binary(BinaryOp::And | BinaryOp::Or, a, b) => is_exact(a, rules) && is_exact(b, rules),
        _ => false,
    }
}

/// Whether `node` reads a tag's or segment's membership, directly or through traits.
fn reads_members(node: &Node, rules: &CompiledRules) -> bool {
    match node {
        Node::Def(id) => {
            let def = rules.def(*id);
            def.kind.has_members() || def.expr.as_ref().is_some_and(|e| reads_members(e, rules))
        }
        Node::List(items) => items.iter().any(|n| reads_members(n, rules)),
        Node::Not(n) | Node::Neg(n) => reads_members(n, rules),
        Node::Binary(_, a, b) => reads_members(a, rules) || reads_members(b, rules),
        Node::Const(_) | Node::Profile(_) | Node::Has(_) | Node::Prop(_) | Node::Agg(_) => false,
    }
}

/// The conjuncts of a chain of `and`s.
fn conjuncts<'n>(node: &'n Node, out: &mut Vec<&'n Node>) {
    match node {
        Node::Binary(BinaryOp::And, a, b) => {
            conjuncts(a, out);
            conjuncts(b, out);
        }
        _ => out.push(node),
    }
}

/// A part of a query the bitmaps cannot answer, judged per candidate on the index. Every
/// candidate already satisfies the exact conjuncts (their sets were intersected into the
/// candidates), so only these are judged.
enum Residual<'n> {
    /// Reads one profile attribute (directly or through traits) and nothing else: judged
    /// once per distinct value, remembered by the column's code.
    OneAttribute(&'n Node, Arc<str>),
    Any(&'n Node),
}

impl<'n> Residual<'n> {
    fn of(node: &'n Node, rules: &CompiledRules) -> Vec<Residual<'n>> {
        let mut parts = Vec::new();
        conjuncts(node, &mut parts);
        parts
            .into_iter()
            .filter(|part| !is_exact(part, rules))
            .map(|part| {
                let mut attrs = Vec::new();
                profile_reads(part, rules, &mut attrs);
                attrs.sort_unstable();
                attrs.dedup();
                match (&attrs[..], reads_members(part, rules)) {
                    ([attr], false) => Residual::OneAttribute(part, attr.clone()),
                    _ => Residual::Any(part),
                }
            })
            .collect()
    }
}

/// Facts of a customer whose only input is one profile attribute's value.
struct OneValueFacts<'a> {
    rules: &'a CompiledRules,
    value: Option<Value>,
    now: i64,
}

impl Facts for OneValueFacts<'_> {
    fn now(&self) -> i64 {
        self.now
    }

    fn aggregate(&self, _: AggId) -> Value {
        Value::Null
    }

    fn profile(&self, _: &str) -> Option<Value> {
        self.value.clone()
    }

    fn definition(&self, id: DefId) -> Value {
        self.rules.evaluate(id, self)
    }

    fn aggregate_next_change(&self, _: AggId) -> Option<i64> {
        None
    }

    fn event_tag_next_change(&self, _: DefId) -> Option<i64> {
        None
    }
}

/// What a judged code came to, for [`Residual::OneAttribute`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Memo {
    Unknown,
    Holds,
    Fails,
}

/// Numbers per block of a columnar scan: one roaring container's worth.
const BLOCK: u64 = 1 << 16;

/// Whether every residual of an expression holds for a customer, judged on the index:
/// residuals that read one profile attribute once per distinct value (by the column's
/// code), the others on [`ColumnFacts`].
struct Judge<'j, 'a> {
    rules: &'a CompiledRules,
    now: i64,
    facts: &'j ColumnFacts<'a>,
    residuals: &'j [Residual<'a>],
    columns: &'j [Option<&'j crate::columns::Column>],
    memos: &'j mut [Vec<Memo>],
}

impl Judge<'_, '_> {
    #[inline]
    fn holds(&mut self, number: u32) -> bool {
        for (i, residual) in self.residuals.iter().enumerate() {
            let holds = match residual {
                Residual::Any(part) => self.facts.holds(part, number),
                Residual::OneAttribute(part, _) => {
                    let column = self.columns[i];
                    let code = column.map_or(0, |c| c.code(number));
                    let judge = || {
                        let value = column.and_then(|c| c.value_of(code, number));
                        let facts = OneValueFacts {
                            rules: self.rules,
                            value,
                            now: self.now,
                        };
                        self.rules.evaluate_node(part, &facts).is_true()
                    };
                    if code == crate::columns::Column::DECIMAL {
                        judge()
                    } else {
                        let memo = &mut self.memos[i];
                        match memo.get(code as usize) {
                            Some(Memo::Holds) => true,
                            Some(Memo::Fails) => false,
                            _ => {
                                let holds = judge();
                                if memo.len() <= code as usize {
                                    memo.resize(code as usize + 1, Memo::Unknown);
                                }
                                memo[code as usize] = if holds { Memo::Holds } else { Memo::Fails };
                                holds
                            }
                        }
                    }
                }
            };
            if !holds {
                return false;
            }
        }
        true
    }
}

/// Facts for an expression that reads no events, answered by the index alone: memberships
/// from the bitmaps, profile attributes from the columns. One per thread, moved from
/// customer to customer.
struct ColumnFacts<'a> {
    rules: &'a CompiledRules,
    index: &'a IndexState,
    /// The bitmap of each tag or segment definition, by `DefId`.
    sets: Vec<Option<&'a RoaringBitmap>>,
    number: Cell<u32>,
    now: i64,
    traits: RefCell<Vec<(DefId, Value)>>,
    /// Traits that read aggregates come from the trait cache (those marked in the slice);
    /// a customer with one not cached is `missed` and judged from the store instead.
    cache: Option<(&'a TraitCache, &'a [bool])>,
    generation: Cell<u32>,
    missed: Cell<bool>,
}

impl<'a> ColumnFacts<'a> {
    fn new(rules: &'a CompiledRules, index: &'a IndexState, now: i64) -> Self {
        let sets = rules
            .defs()
            .iter()
            .map(|def| def.kind.has_members().then(|| index.set(&def.name)).flatten())
            .collect();
        ColumnFacts {
            rules,
            index,
            sets,
            number: Cell::new(0),
            now,
            traits: RefCell::default(),
            cache: None,
            generation: Cell::new(0),
            missed: Cell::new(false),
        }
    }

    fn holds(&self, node: &Node, number: u32) -> bool {
        self.number.set(number);
        self.traits.borrow_mut().clear();
        self.rules.evaluate_node(node, self).is_true()
    }

    /// Whether `node` holds for `number`, or `None` when it needs a trait value the cache
    /// does not have.
    fn holds_cached(&self, node: &Node, number: u32) -> Option<bool> {
        self.generation.set(self.index.generation(number));
        self.missed.set(false);
        let holds = self.holds(node, number);
        (!self.missed.get()).then_some(holds)
    }
}

impl Facts for ColumnFacts<'_> {
    fn now(&self) -> i64 {
        self.now
    }

    fn aggregate(&self, _: AggId) -> Value {
        Value::Null
    }

    fn profile(&self, name: &str) -> Option<Value> {
        self.index.columns().get(name, self.number.get())
    }

    fn definition(&self, id: DefId) -> Value {
        if self.rules.def(id).kind.has_members() {
            return Value::Bool(self.sets[id].is_some_and(|s| s.contains(self.number.get())));
        }
        if let Some((_, v)) = self.traits.borrow().iter().find(|(d, _)| *d == id) {
            return v.clone();
        }
        if let Some((cache, _)) = self.cache.filter(|(_, cached)| cached[id]) {
            let name = &self.rules.def(id).name;
            return match cache.get(name, self.number.get(), self.generation.get(), self.now) {
                Some(v) => v,
                None => {
                    self.missed.set(true);
                    Value::Null
                }
            };
        }
        let v = self.rules.evaluate(id, self);
        self.traits.borrow_mut().push((id, v.clone()));
        v
    }

    fn aggregate_next_change(&self, _: AggId) -> Option<i64> {
        None
    }

    fn event_tag_next_change(&self, _: DefId) -> Option<i64> {
        None
    }
}

/// Whether `node` reads an aggregate outside a trait (`count(view, 7d) > 3` written in
/// the query itself): such a value has no name to be cached under.
fn reads_inline_aggregates(node: &Node) -> bool {
    match node {
        Node::Agg(_) => true,
        Node::List(items) => items.iter().any(reads_inline_aggregates),
        Node::Not(n) | Node::Neg(n) => reads_inline_aggregates(n),
        Node::Binary(_, a, b) => reads_inline_aggregates(a) || reads_inline_aggregates(b),
        Node::Def(_) | Node::Const(_) | Node::Profile(_) | Node::Has(_) | Node::Prop(_) => false,
    }
}

/// Per definition of `rules`: whether it is a trait that reads events (directly or through
/// other traits).
fn event_traits(rules: &CompiledRules) -> Vec<bool> {
    rules
        .defs()
        .iter()
        .map(|def| def.kind == DefKind::Trait && def.expr.as_ref().is_some_and(|e| needs_events(e, rules)))
        .collect()
}

/// The traits reading events that `node` uses, directly or through other traits.
fn used_event_traits(node: &Node, rules: &CompiledRules, event_traits: &[bool], out: &mut Vec<DefId>) {
    match node {
        Node::Def(id) => {
            let def = rules.def(*id);
            if def.kind.has_members() || out.contains(id) {
                return;
            }
            if event_traits[*id] {
                out.push(*id);
            }
            if let Some(expr) = &def.expr {
                used_event_traits(expr, rules, event_traits, out);
            }
        }
        Node::List(items) => items
            .iter()
            .for_each(|n| used_event_traits(n, rules, event_traits, out)),
        Node::Not(n) | Node::Neg(n) => used_event_traits(n, rules, event_traits, out),
        Node::Binary(_, a, b) => {
            used_event_traits(a, rules, event_traits, out);
            used_event_traits(b, rules, event_traits, out);
        }
        Node::Const(_) | Node::Profile(_) | Node::Has(_) | Node::Prop(_) | Node::Agg(_) => {}
    }
}

/// The rules' facts for one customer, with tags and segments answered by the customer's
/// memberships — what the change log and the bitmaps say — rather than recomputed.
struct MemberFacts<'a> {
    inner: EngineFacts<'a>,
    definitions: RefCell<Vec<Option<Value>>>,
}

impl Facts for MemberFacts<'_> {
    fn now(&self) -> i64 {
        self.inner.now()
    }

    fn aggregate(&self, id: AggId) -> Value {
        self.inner.aggregate(id)
    }

    fn profile(&self, name: &str) -> Option<Value> {
        self.inner.profile(name)
    }

    fn definition(&self, id: DefId) -> Value {
        let def = self.inner.rules.def(id);
        if def.kind.has_members() {
            return Value::Bool(self.inner.state.members.contains_key(&def.name));
        }
        if let Some(v) = &self.definitions.borrow()[id] {
            return v.clone();
        }
        let v = self.inner.rules.evaluate(id, self);
        self.definitions.borrow_mut()[id] = Some(v.clone());
        v
    }

    fn aggregate_next_change(&self, id: AggId) -> Option<i64> {
        self.inner.aggregate_next_change(id)
    }

    fn aggregate_leaves(&self, id: AggId, band: &rules::Band) -> Option<i64> {
        self.inner.aggregate_leaves(id, band)
    }

    fn falling_count(&self, id: AggId) -> Option<u64> {
        self.inner.falling_count(id)
    }

    fn count_exit(&self, id: AggId, k: u64) -> Option<i64> {
        self.inner.count_exit(id, k)
    }

    fn event_tag_next_change(&self, id: DefId) -> Option<i64> {
        self.inner.event_tag_next_change(id)
    }
}

/// Rule text `source` with `segment NAME = EXPR` appended, compiled; diagnostics point into
/// `expr`. Also returns the combined text.
pub(super) fn with_segment(
    source: &str,
    name: &str,
    expr: &str,
) -> Result<(CompiledRules, String), Vec<rules::LocatedDiagnostic>> {
    let prefix = format!("{}\nsegment {name} =\n", source.trim_end());
    let text = format!("{prefix}{expr}\n");
    CompiledRules::compile(&text).map(|c| (c, text)).map_err(|diags| {
        diags
            .iter()
            .map(|d| {
                let mut d = d.clone();
                d.span.start = d.span.start.saturating_sub(prefix.len());
                d.span.end = d.span.end.saturating_sub(prefix.len()).max(d.span.start);
                d.located(expr)
            })
            .collect()
    })
}

/// Facts for an expression that reads no events: profile attributes, memberships, and
/// traits computed from those — without the per-definition caches of [`EngineFacts`], which
/// cost more than the evaluation for a rule set of hundreds of definitions.
struct StaticFacts<'a> {
    rules: &'a CompiledRules,
    state: &'a CustomerState,
    now: i64,
    traits: RefCell<Vec<(DefId, Value)>>,
}

impl Facts for StaticFacts<'_> {
    fn now(&self) -> i64 {
        self.now
    }

    fn aggregate(&self, _: AggId) -> Value {
        Value::Null
    }

    fn profile(&self, name: &str) -> Option<Value> {
        self.state.history.profile_value(name)
    }

    fn definition(&self, id: DefId) -> Value {
        let def = self.rules.def(id);
        if def.kind.has_members() {
            return Value::Bool(self.state.members.contains_key(&def.name));
        }
        if let Some((_, v)) = self.traits.borrow().iter().find(|(d, _)| *d == id) {
            return v.clone();
        }
        let v = self.rules.evaluate(id, self);
        self.traits.borrow_mut().push((id, v.clone()));
        v
    }

    fn aggregate_next_change(&self, _: AggId) -> Option<i64> {
        None
    }

    fn event_tag_next_change(&self, _: DefId) -> Option<i64> {
        None
    }
}

/// Parses a members or query cursor: the customer number the previous page ended at.
pub fn parse_cursor(cursor: &str) -> Result<u32, String> {
    cursor
        .parse()
        .map_err(|_| format!("bad cursor `{cursor}`: pass back the `next_cursor` of the previous page"))
}

impl ReadHandle {
    /// An ad-hoc segment: customers for whom `expr` (the rule language's expression syntax,
    /// over tags, traits, segments and profile attributes) holds now. Counts every match and
    /// returns up to `limit` ids after `cursor`; pages follow the index's customer numbers,
    /// and each page is sorted by id.
    pub fn query(&self, expr: &str, limit: usize, cursor: Option<&str>) -> Result<QueryPage, QueryError> {
        let after = cursor.map(parse_cursor).transpose().map_err(QueryError::Cursor)?;
        let rules = self.published.rules();
        let (compiled, _) = with_segment(rules.source(), QUERY_NAME, expr).map_err(QueryError::Invalid)?;
        let id = compiled.lookup(QUERY_NAME).expect("the query definition");
        let matches = self.evaluate_set(&compiled, id, Some(&rules), None)?;
        let mut page = matches.iter().skip_while(|n| after.is_some_and(|a| *n <= a));
        let numbers: Vec<u32> = page.by_ref().take(limit).collect();
        let more = page.next().is_some();
        let ids = self.index.read().ids_of(numbers.iter().copied());
        let mut customers: Vec<String> = ids.iter().map(str::to_owned).collect();
        customers.sort_unstable();
        Ok(QueryPage {
            count: matches.len() as usize,
            customers,
            next_cursor: more.then(|| numbers.last().map(u32::to_string)).flatten(),
        })
    }

    /// An ad-hoc query over the customers of `partitions` only, in customer id order: the
    /// count, and the first `limit` ids after `after` (a node of a cluster answers for the
    /// partitions it owns; the pages of several nodes merge by id).
    pub fn query_partitions(
        &self,
        expr: &str,
        limit: usize,
        after: Option<&str>,
        partitions: &[u32],
    ) -> Result<PartitionsPage, QueryError> {
        let rules = self.published.rules();
        let (compiled, _) = with_segment(rules.source(), QUERY_NAME, expr).map_err(QueryError::Invalid)?;
        let id = compiled.lookup(QUERY_NAME).expect("the query definition");
        let mut matches = self.evaluate_set(&compiled, id, Some(&rules), None)?;
        matches &= self.numbers_of_partitions(partitions);
        let (page, more) = self.first_by_id(&matches, after, limit);
        Ok(PartitionsPage {
            count: matches.len() as usize,
            customers: page.iter().map(str::to_owned).collect(),
            more,
        })
    }

    /// The members of `set` in `partitions` only, in customer id order: the first `limit`
    /// after id `after`, and whether more follow (a node of a group answers for the
    /// partitions it owns; the pages of several nodes merge by id).
    pub fn members_in_partitions(
        &self,
        set: &RoaringBitmap,
        after: Option<&str>,
        limit: usize,
        partitions: &[u32],
    ) -> (crate::index::IdPage, bool) {
        let within = set & &self.numbers_of_partitions(partitions);
        self.first_by_id(&within, after, limit)
    }

    /// The customers of `numbers` with the `limit` smallest ids after `after`, in id order,
    /// and whether more follow: a bounded heap over every id, not a sort of them all.
    fn first_by_id(
        &self,
        numbers: &RoaringBitmap,
        after: Option<&str>,
        limit: usize,
    ) -> (crate::index::IdPage, bool) {
        let mut smallest: std::collections::BinaryHeap<(String, u32)> = std::collections::BinaryHeap::new();
        if limit > 0 {
            let numbers: Vec<u32> = numbers.iter().collect();
            for chunk in numbers.chunks(65_536) {
                let ids = self.index.read().ids_of(chunk.iter().copied());
                for (id, &number) in ids.iter().zip(ids.numbers()) {
                    if after.is_some_and(|a| id <= a) {
                        continue;
                    }
                    if smallest.len() <= limit {
                        smallest.push((id.to_owned(), number));
                    } else if smallest.peek().is_some_and(|(top, _)| id < top.as_str()) {
                        smallest.pop();
                        smallest.push((id.to_owned(), number));
                    }
                }
            }
        }
        let mut first = smallest.into_sorted_vec();
        let more = first.len() > limit;
        first.truncate(limit);
        (
            crate::index::IdPage::from_ids(first.iter().map(|(id, number)| (*number, id.as_str()))),
            more,
        )
    }

    /// The numbers of every customer this store holds: all numbered, but those dropped with
    /// a partition.
    pub fn live_numbers(&self) -> RoaringBitmap {
        let mut numbers = RoaringBitmap::new();
        numbers.insert_range(0..self.index.read().customers());
        numbers -= &self.published.numbers_gone();
        numbers
    }

    /// The numbers of the customers in `partitions` (by their ids' hash), from a table
    /// kept up to date with the numbering.
    pub fn numbers_of_partitions(&self, partitions: &[u32]) -> RoaringBitmap {
        let mut table = self
            .published
            .by_partition
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        {
            let index = self.index.read();
            table.catch_up(&index, self.partitions);
        }
        let mut numbers = RoaringBitmap::new();
        for &p in partitions {
            if let Some(set) = table.sets.get(p as usize) {
                numbers |= set;
            }
        }
        numbers -= &table.gone;
        numbers
    }

    /// The customers for whom definition `id` of `rules` holds now: its bitmap plan, and
    /// the remaining candidates judged one by one when the plan is not exact. `base`, the
    /// published rules `rules` extends, lets values of traits that read events be taken
    /// from (and kept in) the trait cache. `within`: only customers numbered in that range.
    pub(super) fn evaluate_set(
        &self,
        rules: &CompiledRules,
        id: DefId,
        base: Option<&Arc<CompiledRules>>,
        within: Option<std::ops::Range<u32>>,
    ) -> Result<RoaringBitmap, EngineError> {
        let node = rules.def(id).expr.as_ref().expect("a segment has an expression");
        let (mut candidates, exact) = {
            let index = self.index.read();
            let candidates = plan(node, rules, &index);
            let exact = candidates.exact;
            (candidates.materialise(&index), exact)
        };
        // Numbered once, gone since (absorbed by a merge, dropped with a partition).
        candidates -= &self.published.numbers_gone();
        if let Some(range) = within {
            let mut numbers = RoaringBitmap::new();
            numbers.insert_range(range);
            candidates &= numbers;
        }
        if exact {
            Ok(candidates)
        } else {
            self.filter(rules, id, node, candidates, base)
        }
    }

    /// The candidates for whom `node` holds, evaluated one by one on their stored state,
    /// split over the machine's cores; with a clock per partition, each partition's
    /// candidates at its own instant (partitions at the same instant together).
    fn filter(
        &self,
        rules: &CompiledRules,
        id: DefId,
        node: &Node,
        candidates: RoaringBitmap,
        base: Option<&Arc<CompiledRules>>,
    ) -> Result<RoaringBitmap, EngineError> {
        let Some(nows) = self.partition_nows() else {
            return self.filter_at(rules, id, node, candidates, base, self.now());
        };
        let mut by_now: std::collections::BTreeMap<i64, Vec<u32>> = Default::default();
        for (partition, now) in nows.into_iter().enumerate() {
            by_now.entry(now).or_default().push(partition as u32);
        }
        if by_now.len() == 1 {
            let now = by_now.into_keys().next().expect("one instant");
            return self.filter_at(rules, id, node, candidates, base, now);
        }
        let mut out = RoaringBitmap::new();
        for (now, partitions) in by_now {
            let part = &candidates & &self.numbers_of_partitions(&partitions);
            if !part.is_empty() {
                out |= self.filter_at(rules, id, node, part, base, now)?;
            }
        }
        Ok(out)
    }

    /// [`ReadHandle::filter`] with every candidate judged at `now`.
    fn filter_at(
        &self,
        rules: &CompiledRules,
        id: DefId,
        node: &Node,
        candidates: RoaringBitmap,
        base: Option<&Arc<CompiledRules>>,
        now: i64,
    ) -> Result<RoaringBitmap, EngineError> {
        let with_events = needs_events(node, rules);
        let attrs_columnar = {
            let mut attrs = Vec::new();
            profile_reads(node, rules, &mut attrs);
            let index = self.index.read();
            attrs.iter().all(|a| index.columns().is_columnar(a))
        };
        let columnar = !with_events && attrs_columnar;
        let cached = with_events && attrs_columnar && !reads_inline_aggregates(node);
        let base = base.filter(|_| cached);
        let event_traits = event_traits(rules);
        let mut used = Vec::new();
        if let Some(base) = base {
            used_event_traits(node, rules, &event_traits, &mut used);
            let cache = self.index.traits().read().unwrap_or_else(|e| e.into_inner());
            if cache.is_for(base) {
                used.iter().for_each(|id| cache.touch(&rules.def(*id).name));
            } else {
                drop(cache);
                self.index
                    .traits()
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .reset(base);
            }
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        if columnar {
            return Ok(self.filter_columnar(rules, node, now, &candidates, threads));
        }
        let (event_traits, used) = (&event_traits, &used);
        let numbers: Vec<u32> = candidates.iter().collect();
        let per_thread = numbers.len().div_ceil(threads).max(4096);
        std::thread::scope(|scope| {
            let parts: Vec<_> = numbers
                .chunks(per_thread)
                .map(|part| {
                    scope.spawn(move || {
                        if let Some(base) = base {
                            let traits = CachedTraits {
                                base,
                                event_traits,
                                used,
                            };
                            self.filter_cached(rules, node, now, part, &traits)
                        } else {
                            self.filter_part(rules, id, with_events, now, part)
                        }
                    })
                })
                .collect();
            let mut out = RoaringBitmap::new();
            for part in parts {
                out |= part.join().expect("a query thread panicked")?;
            }
            Ok(out)
        })
    }

    /// The candidates for whom `node` holds, judged on the index alone, split over
    /// `threads` runs of equally many candidates.
    fn filter_columnar(
        &self,
        rules: &CompiledRules,
        node: &Node,
        now: i64,
        candidates: &RoaringBitmap,
        threads: usize,
    ) -> RoaringBitmap {
        let (Some(first), Some(last)) = (candidates.min(), candidates.max()) else {
            return RoaringBitmap::new();
        };
        let len = candidates.len();
        let parts = (threads as u64).min(len.div_ceil(BLOCK)).max(1);
        // Part `t` starts at the candidate of rank `len * t / parts`.
        let mut bounds: Vec<u64> = (1..parts)
            .filter_map(|t| candidates.select((len * t / parts) as u32))
            .map(u64::from)
            .collect();
        bounds.insert(0, u64::from(first));
        bounds.push(u64::from(last) + 1);
        std::thread::scope(|scope| {
            let parts: Vec<_> = bounds
                .windows(2)
                .map(|w| {
                    let numbers = w[0]..w[1];
                    scope.spawn(move || self.filter_columnar_part(rules, node, now, candidates, numbers))
                })
                .collect();
            let mut out = RoaringBitmap::new();
            for part in parts {
                out |= part.join().expect("a query thread panicked");
            }
            out
        })
    }

    /// The candidates numbered in `numbers` for whom `node` holds, judged on the index a
    /// block of [`BLOCK`] numbers at a time: candidates are walked as runs, matches set in
    /// a bitset that becomes one bitmap container. The read lock is taken per block so that
    /// the engine's commits are not held up.
    fn filter_columnar_part(
        &self,
        rules: &CompiledRules,
        node: &Node,
        now: i64,
        candidates: &RoaringBitmap,
        numbers: std::ops::Range<u64>,
    ) -> RoaringBitmap {
        let residuals = Residual::of(node, rules);
        // Per residual, what each code came to; codes keep their value for good.
        let mut memos: Vec<Vec<Memo>> = vec![Vec::new(); residuals.len()];
        let mut out = RoaringBitmap::new();
        let mut bits = vec![0u8; (BLOCK / 8) as usize];
        let mut block = numbers.start & !(BLOCK - 1);
        while block < numbers.end {
            let from = numbers.start.max(block) as u32;
            let to = (numbers.end.min(block + BLOCK) - 1) as u32;
            let mut runs = candidates.range(from..=to);
            let mut matched = false;
            {
                let index = self.index.read();
                let facts = ColumnFacts::new(rules, &index, now);
                let columns: Vec<_> = residuals
                    .iter()
                    .map(|r| match r {
                        Residual::OneAttribute(_, attr) => index.columns().column(attr),
                        Residual::Any(_) => None,
                    })
                    .collect();
                let mut judge = Judge {
                    rules,
                    now,
                    facts: &facts,
                    residuals: &residuals,
                    columns: &columns,
                    memos: &mut memos,
                };
                while let Some(run) = runs.next_range() {
                    for number in run {
                        if judge.holds(number) {
                            let bit = (u64::from(number) - block) as usize;
                            bits[bit / 8] |= 1 << (bit % 8);
                            matched = true;
                        }
                    }
                }
            }
            if matched {
                out |= RoaringBitmap::from_lsb0_bytes(block as u32, &bits);
                bits.fill(0);
            }
            block += BLOCK;
        }
        out
    }

    /// The candidates for whom `node` holds, with the values of traits that read events
    /// from the trait cache; customers missing from it are read from the store, judged,
    /// and their values put in the cache.
    fn filter_cached(
        &self,
        rules: &CompiledRules,
        node: &Node,
        now: i64,
        numbers: &[u32],
        traits: &CachedTraits<'_>,
    ) -> Result<RoaringBitmap, EngineError> {
        let mut out = RoaringBitmap::new();
        for slice in numbers.chunks(4096) {
            // Each miss with the generation seen before its record is read: a commit in
            // between moves the generation on and so voids what is computed here.
            let mut misses: Vec<(u32, u32)> = Vec::new();
            {
                let index = self.index.read();
                let cache = self.index.traits().read().unwrap_or_else(|e| e.into_inner());
                let usable = cache.is_for(traits.base);
                let mut facts = ColumnFacts::new(rules, &index, now);
                facts.cache = Some((&cache, traits.event_traits));
                for &number in slice {
                    match usable.then(|| facts.holds_cached(node, number)).flatten() {
                        Some(true) => {
                            out.insert(number);
                        }
                        Some(false) => {}
                        None => misses.push((number, index.generation(number))),
                    }
                }
            }
            if misses.is_empty() {
                continue;
            }
            let ids = self.index.read().ids_of(misses.iter().map(|(n, _)| *n));
            let generations: std::collections::HashMap<u32, u32> = misses.into_iter().collect();
            let mut computed: Vec<Vec<TraitValue>> = traits.used.iter().map(|_| Vec::new()).collect();
            for (i, customer) in ids.iter().enumerate() {
                let Some(mut state) = self.store.load_customer_current(customer, self.current(rules))? else {
                    continue;
                };
                let number = ids.numbers()[i];
                state.advance_windows(rules, now, self.retention_ms);
                let facts = MemberFacts {
                    inner: EngineFacts::new(rules, &state, now, self.retention_ms),
                    definitions: RefCell::new(vec![None; rules.defs().len()]),
                };
                if rules.evaluate_node(node, &facts).is_true() {
                    out.insert(number);
                }
                for (values, &id) in computed.iter_mut().zip(traits.used) {
                    values.push(TraitValue {
                        number,
                        generation: generations[&number],
                        value: facts.definition(id),
                        valid_until: rules.next_change_of(id, &facts).unwrap_or(i64::MAX),
                    });
                }
            }
            let mut cache = self.index.traits().write().unwrap_or_else(|e| e.into_inner());
            if cache.is_for(traits.base) {
                for (values, &id) in computed.iter().zip(traits.used) {
                    cache.put(&rules.def(id).name, values);
                }
            }
        }
        Ok(out)
    }

    fn filter_part(
        &self,
        rules: &CompiledRules,
        id: DefId,
        with_events: bool,
        now: i64,
        numbers: &[u32],
    ) -> Result<RoaringBitmap, EngineError> {
        let mut out = RoaringBitmap::new();
        for chunk in numbers.chunks(256) {
            let ids = self.index.read().ids_of(chunk.iter().copied());
            let states = if with_events {
                ids.iter()
                    .map(|customer| self.store.load_customer_current(customer, self.current(rules)))
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                self.store.load_records(ids.iter())?
            };
            for (i, state) in states.into_iter().enumerate() {
                let Some(mut state) = state else { continue };
                let holds = if with_events {
                    state.advance_windows(rules, now, self.retention_ms);
                    let facts = MemberFacts {
                        inner: EngineFacts::new(rules, &state, now, self.retention_ms),
                        definitions: RefCell::new(vec![None; rules.defs().len()]),
                    };
                    rules.evaluate(id, &facts).is_true()
                } else {
                    let facts = StaticFacts {
                        rules,
                        state: &state,
                        now,
                        traits: RefCell::default(),
                    };
                    rules.evaluate(id, &facts).is_true()
                };
                if holds {
                    out.insert(ids.numbers()[i]);
                }
            }
        }
        Ok(out)
    }

    /// The members of a tag or segment as of the last commit (`None`: the rules do not
    /// define it and nobody ever had it).
    pub fn member_set(&self, name: &str) -> Option<RoaringBitmap> {
        let index = self.index.read();
        match index.set(name) {
            Some(set) => Some(set.clone()),
            None => {
                let rules = self.published.rules();
                let defined = rules
                    .lookup(name)
                    .is_some_and(|id| rules.def(id).kind.has_members());
                defined.then(RoaringBitmap::new)
            }
        }
    }

    /// Every definition of the loaded rule set in the order written, with its members now
    /// and its enters and exits per hour over the `hours` hours up to now.
    pub fn definitions(&self, hours: i64) -> Vec<DefinitionSummary> {
        self.definitions_in(hours, None)
    }

    /// [`Self::definitions`] with members counted in `partitions` only (a node of a
    /// cluster answers for the partitions it owns; its activity is the changes it made).
    pub fn definitions_in(&self, hours: i64, partitions: Option<&[u32]>) -> Vec<DefinitionSummary> {
        let within = partitions.map(|p| self.numbers_of_partitions(p));
        let rules = self.published.rules();
        let from = self.now() - hours.clamp(1, crate::index::ACTIVITY_HOURS) * 3_600_000;
        let index = self.index.read();
        rules
            .defs()
            .iter()
            .map(|def| DefinitionSummary {
                name: def.name.to_string(),
                kind: match def.kind {
                    DefKind::ConditionTag => "tag",
                    DefKind::EventTag => "event_tag",
                    DefKind::Segment => "segment",
                    DefKind::Trait => "trait",
                },
                source: def.source.clone(),
                members: def.kind.has_members().then(|| {
                    index.set(&def.name).map_or(0, |set| {
                        within.as_ref().map_or(set.len(), |w| set.intersection_len(w))
                    })
                }),
                activity: index
                    .activity(&def.name)
                    .into_iter()
                    .flat_map(|a| a.hours())
                    .filter(|(hour, ..)| *hour + 3_600_000 > from)
                    .map(|(hour, entered, left)| HourActivity { hour, entered, left })
                    .collect(),
            })
            .collect()
    }

    /// The ids of customer numbers, copied out of the index.
    pub fn ids_of(&self, numbers: impl IntoIterator<Item = u32>) -> IdPage {
        self.index.read().ids_of(numbers)
    }

    /// One page of members of `name` (whose members are `set`) after the customer number
    /// `after`, with `fields` read from each member's stored state (through `maps`, as
    /// [`ReadHandle::fields_of_mapped`] reads them).
    pub fn members_page(
        &self,
        name: &str,
        set: &RoaringBitmap,
        after: Option<u32>,
        limit: usize,
        fields: &[ExportField],
        maps: &mut [Option<ValueMap>],
    ) -> Result<MembersPage, EngineError> {
        let mut numbers = set.iter().skip_while(|n| after.is_some_and(|a| *n <= a));
        let page: Vec<u32> = numbers.by_ref().take(limit).collect();
        let more = numbers.next().is_some();
        let ids = self.ids_of(page.iter().copied());
        let fields = self.fields_of_mapped(name, ids.numbers(), fields, maps)?;
        Ok(MembersPage {
            ids,
            fields,
            next_cursor: more.then(|| page.last().map(u32::to_string)).flatten(),
        })
    }

    /// The requested fields of each customer of `ids` (nothing read when `fields` is empty).
    pub fn fields_of(
        &self,
        name: &str,
        ids: &IdPage,
        fields: &[ExportField],
    ) -> Result<Vec<Vec<Option<Value>>>, EngineError> {
        self.fields_of_mapped(name, ids.numbers(), fields, &mut [])
    }

    /// [`ReadHandle::fields_of`] with the values of field `i` passed through `maps[i]` when it
    /// is `Some` (a masked column): a profile attribute's dictionary entries are mapped once
    /// per map, so a masked row costs what an unmasked one does.
    ///
    /// Customers are given by number: profile columns are read by number, and the ids are
    /// looked up only when the customers' stored states are read.
    pub fn fields_of_mapped(
        &self,
        name: &str,
        numbers: &[u32],
        fields: &[ExportField],
        maps: &mut [Option<ValueMap>],
    ) -> Result<Vec<Vec<Option<Value>>>, EngineError> {
        if fields.is_empty() {
            return Ok(Vec::new());
        }
        // Profile attributes alone: the columns, no store read.
        {
            let index = self.index.read();
            let columns = index.columns();
            let columnar = fields
                .iter()
                .all(|f| matches!(f, ExportField::Profile(attr) if columns.is_columnar(attr)));
            if columnar {
                // Each field's column looked up once per page, not once per row.
                let of_field: Vec<_> = fields
                    .iter()
                    .map(|f| match f {
                        ExportField::Profile(attr) => columns.column(attr),
                        _ => None,
                    })
                    .collect();
                let mut out = Vec::with_capacity(numbers.len());
                for &n in numbers {
                    let row = of_field.iter().enumerate().map(|(i, column)| {
                        let column = (*column)?;
                        match maps.get_mut(i) {
                            Some(Some(map)) => column.get_mapped(n, map),
                            _ => column.get(n),
                        }
                    });
                    out.push(row.collect());
                }
                return Ok(out);
            }
        }
        let rules = self.published.rules();
        let with_events = fields.iter().any(|f| matches!(f, ExportField::Trait(_)));
        let now = self.now();
        let ids = self.ids_of(numbers.iter().copied());
        let mut out = Vec::with_capacity(ids.len());
        for id in ids.iter() {
            let state = if with_events {
                self.store.load_customer_current(id, self.current(&rules))?
            } else {
                self.store.load_record(id)?
            };
            let mut state = state.unwrap_or_default();
            let mut row = field_values(&rules, name, &mut state, now, self.retention_ms, fields);
            if fields.iter().any(|f| matches!(f, ExportField::Identifier(_))) {
                let owned = self.identifiers(id)?;
                for (value, field) in row.iter_mut().zip(fields) {
                    if let ExportField::Identifier(id_type) = field {
                        let of_type: Vec<&str> = owned
                            .iter()
                            .filter(|(t, _)| t == id_type)
                            .map(|(_, v)| v.as_str())
                            .collect();
                        *value = (!of_type.is_empty()).then(|| Value::str(&of_type.join(",")));
                    }
                }
            }
            for (value, map) in row.iter_mut().zip(maps.iter()) {
                if let (Some(v), Some(map)) = (value.as_mut(), map) {
                    *v = map.apply(v);
                }
            }
            out.push(row);
        }
        Ok(out)
    }

    /// Who entered and who exited `name` between `after` and `until` (change log `seq`s):
    /// the net of every change in between, so a customer who entered and left again is in
    /// neither list. Ids in customer-number order.
    pub fn delta(&self, name: &str, after: u64, until: u64) -> Result<Delta, EngineError> {
        // Per customer: member at `after`, member at `until`.
        let mut net: std::collections::BTreeMap<u32, (bool, bool)> = Default::default();
        let mut from = after;
        while from < until {
            let changes = crate::engine::read::changes_of(&self.store, name, from, 10_000)?;
            let Some(last) = changes.last() else { break };
            from = last.1.seq;
            for (number, change) in changes.iter().filter(|(_, c)| c.seq <= until) {
                let now_member = change.op == crate::change::Op::Add;
                net.entry(*number).or_insert((!now_member, now_member)).1 = now_member;
            }
        }
        let (mut entered, mut exited) = (Vec::new(), Vec::new());
        for (number, (before, after)) in net {
            match (before, after) {
                (false, true) => entered.push(number),
                (true, false) => exited.push(number),
                _ => {}
            }
        }
        Ok(Delta {
            entered: self.ids_of(entered),
            exited: self.ids_of(exited),
            until,
        })
    }

    /// Resolves an export field: `since` or `expires_at` (of the membership),
    /// `profile.ATTR`, `ids.TYPE`, or the name of a trait; with its value type (`Any` for
    /// profile attributes, `Str` for identifiers, `Dur` — integer ms — for the membership's
    /// instants).
    pub fn export_field(&self, name: &str) -> Result<(ExportField, Type), String> {
        const KINDS: &str = "fields are since, expires_at, traits, profile.ATTR or ids.TYPE";
        if let Some(id_type) = name.strip_prefix("ids.") {
            return match self.identity.position(id_type) {
                Some(i) => Ok((
                    ExportField::Identifier(self.identity.types[i].name.clone()),
                    Type::Str,
                )),
                None => Err(format!(
                    "`{id_type}` is not an identifier type (known: {})",
                    self.identity.names()
                )),
            };
        }
        match name {
            "since" => return Ok((ExportField::Since, Type::Dur)),
            "expires_at" => return Ok((ExportField::ExpiresAt, Type::Dur)),
            _ => {}
        }
        if let Some(attr) = name.strip_prefix("profile.") {
            if attr.is_empty() {
                return Err("`profile.` needs an attribute name".into());
            }
            return Ok((ExportField::Profile(Arc::from(attr)), Type::Any));
        }
        let rules = self.published.rules();
        match rules.lookup(name) {
            Some(id) if rules.def(id).kind == DefKind::Trait => {
                Ok((ExportField::Trait(id), rules.def(id).ty))
            }
            Some(_) => Err(format!("`{name}` is not a trait ({KINDS})")),
            None => Err(format!("unknown field `{name}` ({KINDS})")),
        }
    }
}

/// The net membership change of a tag or segment between two points of the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub entered: IdPage,
    pub exited: IdPage,
    /// The last `seq` included: the `after` of the next delta.
    pub until: u64,
}

/// The requested fields of one member.
pub(super) fn field_values(
    rules: &CompiledRules,
    name: &str,
    state: &mut CustomerState,
    now: i64,
    retention_ms: i64,
    fields: &[ExportField],
) -> Vec<Option<Value>> {
    if fields.iter().any(|f| matches!(f, ExportField::Trait(_))) {
        state.advance_windows(rules, now, retention_ms);
    }
    let membership = state.members.get(name).cloned();
    let facts = EngineFacts::new(rules, state, now, retention_ms);
    fields
        .iter()
        .map(|f| match f {
            ExportField::Since => membership.as_ref().map(|m| Value::Dur(m.since)),
            ExportField::ExpiresAt => membership.as_ref().and_then(|m| m.expires_at).map(Value::Dur),
            ExportField::Trait(id) if rules.def(*id).kind == DefKind::Trait => {
                Some(facts.definition(*id)).filter(|v| *v != Value::Null)
            }
            ExportField::Trait(_) | ExportField::Identifier(_) => None,
            ExportField::Profile(attr) => state.history.profile_value(attr),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_customer_numbers() {
        assert_eq!(parse_cursor("42"), Ok(42));
        assert!(parse_cursor("c-42").unwrap_err().contains("bad cursor `c-42`"));
    }
}

/// One definition of the loaded rule set, as `GET /v1/definitions` lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DefinitionSummary {
    pub name: String,
    /// `tag`, `event_tag`, `segment` or `trait`.
    pub kind: &'static str,
    /// The definition as written.
    pub source: String,
    /// Members now; `None` for traits.
    pub members: Option<u64>,
    /// Hours with a change, oldest first.
    pub activity: Vec<HourActivity>,
}

/// How many customers entered and left a tag or segment in one hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HourActivity {
    /// The hour's first instant (ms).
    pub hour: i64,
    pub entered: u64,
    pub left: u64,
}

/// Customer numbers by partition, extended as customers are numbered (numbers are never
/// reused), without the numbers of customers gone from this store with a dropped
/// partition: a partition taken in again numbers its customers anew.
#[derive(Debug, Default)]
pub(crate) struct PartitionNumbers {
    /// Numbers below this are in `sets`.
    covered: u32,
    partitions: u32,
    sets: Vec<RoaringBitmap>,
    /// Numbers of customers a dropped partition took away (kept in `meta`).
    pub(super) gone: RoaringBitmap,
}

impl PartitionNumbers {
    fn catch_up(&mut self, index: &crate::index::IndexState, partitions: u32) {
        let customers = index.customers();
        if self.partitions != partitions || customers < self.covered {
            // Another partition count, or an index built again: start over.
            *self = PartitionNumbers {
                covered: 0,
                partitions,
                sets: vec![RoaringBitmap::new(); partitions.max(1) as usize],
                gone: std::mem::take(&mut self.gone),
            };
        }
        for number in self.covered..customers {
            if let Some(id) = index.id(number) {
                let p = crate::partition::partition_of(id.as_bytes(), partitions.max(1));
                self.sets[p as usize].insert(number);
            }
        }
        self.covered = customers;
    }
}
