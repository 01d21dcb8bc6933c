//! Why does a customer have a value? [`CompiledRules::explain`] evaluates one definition
//! node by node and reports every sub-expression's value, each aggregate's window, and the
//! definitions it reads, so support can answer "why is Alice (not) a `vip`?" without
//! reading the rules and the events side by side.

use serde::Serialize;

use crate::ast::{quote, Window};
use crate::compile::{AggId, CompiledRules, DefId, DefKind, Node};
use crate::eval::{eval_node, Facts, FactsScope};
use crate::value::Value;

/// One evaluated sub-expression.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExplainNode {
    /// The sub-expression in the rule language, e.g. `sum(payment.amount, 30d) >= 2000`.
    pub expr: String,
    pub value: Value,
    /// For aggregates: the events they read at this instant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowBounds>,
    /// Operands other than constants, or for a definition reference, the referenced
    /// definition's expression.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<ExplainNode>,
}

/// The events an aggregate reads: type `event_type`, matching `where`, and
/// `from < ts <= to` (`from` is absent for lifetime aggregates and `last`/`first`/`since`,
/// which read every retained event up to `to`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowBounds {
    pub event_type: String,
    #[serde(rename = "where", skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_exclusive: Option<i64>,
    pub to_inclusive: i64,
}

impl CompiledRules {
    /// Evaluates definition `id` and every sub-expression of it against `facts`.
    /// Definitions it reads are expanded beneath their reference; event tags (which are
    /// state, not expressions) are leaves whose window is their ttl.
    pub fn explain<F: Facts + ?Sized>(&self, id: DefId, facts: &F) -> ExplainNode {
        let def = &self.defs[id];
        let children = match (&def.expr, def.kind) {
            (Some(node), k) if k != DefKind::EventTag => vec![self.explain_node(node, facts)],
            _ => Vec::new(),
        };
        // An event tag holds while a matching event lies within its ttl.
        let window = def.event_tag.as_ref().map(|spec| WindowBounds {
            event_type: spec.event_type.to_string(),
            filter: spec.filter.as_ref().map(|f| self.render(f)),
            from_exclusive: spec.ttl_ms.map(|ttl| facts.now().saturating_sub(ttl)),
            to_inclusive: facts.now(),
        });
        ExplainNode {
            expr: def.name.to_string(),
            value: self.evaluate(id, facts),
            window,
            children,
        }
    }

    /// The earliest instant after `facts.now()` at which definition `id` could change by
    /// time alone: the next window exit or entry, ttl expiry or `since` crossing among the
    /// aggregates and definitions it reads. Like [`CompiledRules::next_change`] it may be
    /// early (the value is then unchanged at that instant) but never late.
    pub fn next_change_of<F: Facts + ?Sized>(&self, id: DefId, facts: &F) -> Option<i64> {
        let def = &self.defs[id];
        // A trait built on `since` grows with the clock: it changes every millisecond.
        if let (DefKind::Trait, true, Some(expr)) = (def.kind, def.uses_since, &def.expr) {
            if self.grows_with_time(expr, facts) {
                return facts.now().checked_add(1);
            }
        }
        let (defs, aggs) = self.reads([id]);
        self.next_change_where(facts, |a| aggs[a], |d| defs[d])
    }

    /// The definitions (including `ids`) and aggregates that `ids` read, transitively.
    pub(crate) fn reads(&self, ids: impl IntoIterator<Item = DefId>) -> (Vec<bool>, Vec<bool>) {
        let mut defs = vec![false; self.defs.len()];
        let mut aggs = vec![false; self.aggregates.len()];
        let mut stack: Vec<DefId> = ids.into_iter().collect();
        while let Some(d) = stack.pop() {
            if std::mem::replace(&mut defs[d], true) {
                continue;
            }
            if let Some(node) = &self.defs[d].expr {
                collect_aggs(node, &mut aggs);
            }
            stack.extend(self.defs[d].deps.iter().copied().filter(|x| !defs[*x]));
        }
        (defs, aggs)
    }

    fn explain_node<F: Facts + ?Sized>(&self, node: &Node, facts: &F) -> ExplainNode {
        let value = eval_node(node, &FactsScope(facts));
        let (window, children) = match node {
            Node::Agg(id) => (Some(self.window_bounds(*id, facts.now())), Vec::new()),
            Node::Def(id) => {
                let inner = self.explain(*id, facts);
                (None, inner.children)
            }
            Node::Not(inner) | Node::Neg(inner) => (None, self.explain_operands([&**inner], facts)),
            Node::Binary(_, l, r) => (None, self.explain_operands([&**l, &**r], facts)),
            Node::List(items) => (None, self.explain_operands(items, facts)),
            _ => (None, Vec::new()),
        };
        ExplainNode {
            expr: self.render(node),
            value,
            window,
            children,
        }
    }

    /// The operands worth showing: constants are already spelled out in the parent's text.
    fn explain_operands<'n, F: Facts + ?Sized>(
        &self,
        operands: impl IntoIterator<Item = &'n Node>,
        facts: &F,
    ) -> Vec<ExplainNode> {
        operands
            .into_iter()
            .filter(|n| !matches!(n, Node::Const(_)))
            .map(|n| self.explain_node(n, facts))
            .collect()
    }

    fn window_bounds(&self, id: AggId, now: i64) -> WindowBounds {
        let spec = &self.aggregates[id];
        WindowBounds {
            event_type: spec.event_type.to_string(),
            filter: spec.filter.as_ref().map(|f| self.render(f)),
            from_exclusive: match spec.window {
                Some(Window::Span(ms)) => Some(now.saturating_sub(ms)),
                Some(Window::Lifetime) | None => None,
            },
            to_inclusive: now,
        }
    }

    /// A compiled expression back in the rule language (constants folded, names resolved).
    pub fn render(&self, node: &Node) -> String {
        let mut out = String::new();
        self.render_into(node, 0, &mut out);
        out
    }

    fn render_into(&self, node: &Node, outer: u8, out: &mut String) {
        use std::fmt::Write;
        match node {
            Node::Const(v) => {
                let _ = write!(out, "{v}");
            }
            Node::List(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    self.render_into(item, 0, out);
                }
                out.push(']');
            }
            Node::Profile(name) => {
                out.push_str("profile.");
                push_name(name, out);
            }
            Node::Has(name) => {
                out.push_str("has(profile.");
                push_name(name, out);
                out.push(')');
            }
            Node::Prop(path) => push_name(path, out),
            Node::Agg(id) => out.push_str(&self.aggregates[*id].text),
            Node::Def(id) => out.push_str(&self.defs[*id].name),
            Node::Not(inner) => {
                let wrap = outer > NOT;
                wrap.then(|| out.push('('));
                out.push_str("not ");
                self.render_into(inner, NOT, out);
                wrap.then(|| out.push(')'));
            }
            Node::Neg(inner) => {
                out.push('-');
                self.render_into(inner, NEG, out);
            }
            Node::Binary(op, l, r) => {
                let p = op.precedence();
                let wrap = outer > p;
                wrap.then(|| out.push('('));
                self.render_into(l, p, out);
                out.push(' ');
                out.push_str(op.symbol());
                out.push(' ');
                // Left-associative: a right operand of equal precedence needs parentheses.
                self.render_into(r, p + 1, out);
                wrap.then(|| out.push(')'));
            }
        }
    }
}

const NOT: u8 = 3;
const NEG: u8 = 7;

/// Dotted paths print as written unless a segment needs quoting.
fn push_name(path: &str, out: &mut String) {
    for (i, part) in path.split('.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        let plain = part.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_')
            && part.chars().all(|c| c.is_alphanumeric() || c == '_');
        if plain {
            out.push_str(part);
        } else {
            out.push_str(&quote(part));
        }
    }
}

fn collect_aggs(node: &Node, aggs: &mut [bool]) {
    match node {
        Node::Agg(id) => aggs[*id] = true,
        Node::Not(inner) | Node::Neg(inner) => collect_aggs(inner, aggs),
        Node::Binary(_, l, r) => {
            collect_aggs(l, aggs);
            collect_aggs(r, aggs);
        }
        Node::List(items) => items.iter().for_each(|n| collect_aggs(n, aggs)),
        Node::Const(_) | Node::Profile(_) | Node::Has(_) | Node::Prop(_) | Node::Def(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Props};
    use crate::history::{CustomerHistory, DEFAULT_RETENTION_MS};

    const DAY: i64 = 86_400_000;

    fn payment(ts: i64, amount: i64) -> Event {
        Event {
            event_type: "payment".into(),
            ts,
            arrival: ts as u64,
            props: Props::new(vec![("amount".into(), Value::num(amount))]),
        }
    }

    #[test]
    fn explains_each_sub_expression_with_window_bounds() {
        let rules = CompiledRules::compile(
            "trait spend_30d = sum(payment.amount, 30d)\n\
             tag big_spender = spend_30d >= 2000 and not (profile.city == \"上海\")\n",
        )
        .unwrap();
        let mut alice = CustomerHistory::new();
        alice.push(payment(0, 1500), []);
        alice.push(payment(DAY, 700), []);
        let now = 2 * DAY;
        let facts = alice.facts(&rules, now, DEFAULT_RETENTION_MS);
        let tag = rules.lookup("big_spender").unwrap();
        let e = rules.explain(tag, &facts);
        assert_eq!(e.expr, "big_spender");
        assert_eq!(e.value, Value::Bool(true));
        let and = &e.children[0];
        assert_eq!(and.expr, "spend_30d >= 2000 and not profile.city == \"上海\"");
        let cmp = &and.children[0];
        assert_eq!(cmp.expr, "spend_30d >= 2000");
        let spend = &cmp.children[0];
        assert_eq!(
            (spend.expr.as_str(), &spend.value),
            ("spend_30d", &Value::num(2200))
        );
        let sum = &spend.children[0];
        assert_eq!(sum.expr, "sum(payment.amount, 30d)");
        let w = sum.window.as_ref().unwrap();
        assert_eq!((w.from_exclusive, w.to_inclusive), (Some(now - 30 * DAY), now));
        assert_eq!(w.event_type, "payment");
        let not = &and.children[1];
        assert_eq!(
            (not.expr.as_str(), &not.value),
            ("not profile.city == \"上海\"", &Value::Bool(true))
        );
        assert_eq!(
            not.children[0].children[0].value,
            Value::Null,
            "unset profile is null"
        );

        // The first payment leaves the window 30 days after it: the tag's next change.
        assert_eq!(rules.next_change_of(tag, &facts), Some(30 * DAY));
    }

    #[test]
    fn next_change_of_ignores_definitions_not_read() {
        let rules = CompiledRules::compile(
            "tag recent_payer = count(payment, 1d) > 0\n\
             tag lead_waiting = since(lead_created) > 45m\n",
        )
        .unwrap();
        let mut bob = CustomerHistory::new();
        bob.push(payment(0, 10), []);
        let lead = Event {
            event_type: "lead_created".into(),
            ts: 1000,
            arrival: 1,
            props: Props::default(),
        };
        bob.push(lead, []);
        let facts = bob.facts(&rules, 2000, DEFAULT_RETENTION_MS);
        let payer = rules.lookup("recent_payer").unwrap();
        let waiting = rules.lookup("lead_waiting").unwrap();
        assert_eq!(rules.next_change_of(payer, &facts), Some(DAY));
        assert_eq!(
            rules.next_change_of(waiting, &facts),
            Some(1000 + 45 * 60_000 + 1)
        );
        assert_eq!(rules.next_change(&facts), Some(1000 + 45 * 60_000 + 1));
    }

    #[test]
    fn a_trait_that_grows_with_time_changes_at_the_next_millisecond() {
        let rules = CompiledRules::compile(
            "trait waited = since(lead_created)\ntrait waited_days = since(lead_created) / 1d\n",
        )
        .unwrap();
        let mut carol = CustomerHistory::new();
        carol.push(
            Event {
                event_type: "lead_created".into(),
                ts: 1000,
                arrival: 0,
                props: Props::default(),
            },
            [],
        );
        let facts = carol.facts(&rules, 5000, DEFAULT_RETENTION_MS);
        for name in ["waited", "waited_days"] {
            let id = rules.lookup(name).unwrap();
            assert_eq!(rules.next_change_of(id, &facts), Some(5001), "{name}");
        }
        // No lead yet: `since` is null and stays null until an event comes.
        let empty = CustomerHistory::new();
        let facts = empty.facts(&rules, 5000, DEFAULT_RETENTION_MS);
        assert_eq!(
            rules.next_change_of(rules.lookup("waited").unwrap(), &facts),
            None
        );
    }

    #[test]
    fn render_keeps_precedence_with_parentheses() {
        let rules = CompiledRules::compile(
            "trait x = (profile.a + 1) * 2 - (3 - profile.b)\n\
             tag t = not (profile.a > 1 or profile.b > 2) and profile.c in [\"a b\", \"c\"]\n",
        )
        .unwrap();
        let text = |name: &str| rules.render(rules.def(rules.lookup(name).unwrap()).expr.as_ref().unwrap());
        assert_eq!(text("x"), "(profile.a + 1) * 2 - (3 - profile.b)");
        assert_eq!(
            text("t"),
            "not (profile.a > 1 or profile.b > 2) and profile.c in [\"a b\", \"c\"]"
        );
    }
}
