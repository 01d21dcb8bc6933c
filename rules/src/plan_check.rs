//! Rules checked against what events carry: a tracking plan (errors: `E04xx`), or the
//! schema actually received when there is no plan (warnings: `W05xx`).
//!
//! A rule that reads `veiw` or `categroy` compiles — the language cannot know the event
//! types — and then silently never fires. This pass finds every event type, property and
//! profile attribute a rule set reads, and every comparison of one with a literal, and
//! judges them against the catalog.

use std::collections::BTreeMap;

use crate::ast::{BinaryOp, DefBody, Expr, ExprKind, Ident, Literal};
use crate::diagnostic::{did_you_mean, Code, Diagnostic, Span};
use crate::normalize::normalize;
use crate::plan::{FieldSet, FieldSpec, FieldType, TrackingPlan};
use crate::value::{Type, Value};

/// What the rules are judged against.
pub enum Catalog<'a> {
    /// A tracking plan: what it does not list is an error (a warning where it allows
    /// additional properties).
    Plan(&'a TrackingPlan),
    /// The event types with the properties seen of each, and the profile attributes seen:
    /// what was never received is a warning.
    Observed {
        events: &'a BTreeMap<String, Vec<String>>,
        profile: &'a [String],
    },
}

/// Every diagnostic for the rule text `source` against `catalog` (none for text that does
/// not parse: the compiler reports that).
pub fn check_rules_against(source: &str, catalog: &Catalog<'_>) -> Vec<Diagnostic> {
    let (file, errors) = crate::parser::parse(source);
    if !errors.is_empty() {
        return Vec::new();
    }
    let mut checker = Checker {
        catalog,
        out: Vec::new(),
    };
    for def in &file.defs {
        match &def.body {
            DefBody::Trait(e) | DefBody::Segment(e) | DefBody::ConditionTag { expr: e, .. } => {
                checker.expr(e, None)
            }
            DefBody::EventTag {
                event_type, filter, ..
            } => {
                let known = checker.event_type(event_type);
                if let Some(f) = filter {
                    checker.expr(f, known.then_some(event_type));
                }
            }
        }
    }
    checker.out
}

/// Like [`check_rules_against`] for a segment expression (`POST /v1/segments/query`,
/// `PUT /v1/segments/{name}`): its profile attributes and aggregates, spans within `expr`.
pub fn check_expr_against(expr: &str, catalog: &Catalog<'_>) -> Vec<Diagnostic> {
    let Ok(parsed) = crate::parser::parse_expr(expr) else {
        return Vec::new();
    };
    let mut checker = Checker {
        catalog,
        out: Vec::new(),
    };
    checker.expr(&parsed, None);
    checker.out
}

/// [`check_rules_against`] a tracking plan.
pub fn check_against_plan(source: &str, plan: &TrackingPlan) -> Vec<Diagnostic> {
    check_rules_against(source, &Catalog::Plan(plan))
}

struct Checker<'a, 'c> {
    catalog: &'c Catalog<'a>,
    out: Vec<Diagnostic>,
}

/// Where a name points: a planned field (its spec, if the catalog has types).
enum Found<'s> {
    Known(Option<&'s FieldSpec>),
    Unknown,
}

impl<'a> Checker<'a, '_> {
    /// Checks an event type reference; true when the catalog knows it.
    fn event_type(&mut self, ident: &Ident) -> bool {
        let name = normalize(&ident.name);
        let (known, names, code, what): (bool, Vec<&str>, Code, &str) = match self.catalog {
            Catalog::Plan(plan) => (
                plan.event(&name).is_some(),
                plan.events.keys().map(String::as_str).collect(),
                Code::E0401,
                "is not in the tracking plan",
            ),
            Catalog::Observed { events, .. } => (
                events.contains_key(&*name),
                events.keys().map(String::as_str).collect(),
                Code::W0501,
                "has never been received",
            ),
        };
        if !known {
            self.report(
                code,
                ident.span,
                format!("event type `{}` {what}", ident.name),
                &name,
                names,
            );
        }
        known
    }

    fn property(&mut self, event_type: &Ident, path: &str, span: Span) -> Found<'a> {
        let t = normalize(&event_type.name);
        match self.catalog {
            Catalog::Plan(plan) => {
                let Some(set) = plan.event(&t) else {
                    return Found::Known(None);
                };
                self.field(
                    set,
                    path,
                    span,
                    Code::E0402,
                    &format!("property `{path}` of `{t}`"),
                )
            }
            Catalog::Observed { events, .. } => {
                let Some(props) = events.get(&*t) else {
                    return Found::Known(None);
                };
                if props.iter().any(|p| p == path) {
                    return Found::Known(None);
                }
                let names = props.iter().map(String::as_str).collect();
                let message = format!("property `{path}` has never been received with `{t}`");
                self.report(Code::W0502, span, message, path, names);
                Found::Unknown
            }
        }
    }

    fn profile(&mut self, ident: &Ident) -> Found<'a> {
        match self.catalog {
            Catalog::Plan(plan) => match &plan.profile {
                None => Found::Known(None),
                Some(set) => self.field(
                    set,
                    &ident.name,
                    ident.span,
                    Code::E0403,
                    &format!("profile attribute `{}`", ident.name),
                ),
            },
            Catalog::Observed { profile, .. } => {
                if profile.contains(&ident.name) {
                    return Found::Known(None);
                }
                let names = profile.iter().map(String::as_str).collect();
                let message = format!("profile attribute `{}` has never been received", ident.name);
                self.report(Code::W0503, ident.span, message, &ident.name, names);
                Found::Unknown
            }
        }
    }

    /// A name in a planned field set: known, or an error (a warning where the set allows
    /// additional fields: then it may be fine, but is more likely a typo).
    fn field(&mut self, set: &'a FieldSet, name: &str, span: Span, code: Code, what: &str) -> Found<'a> {
        if let Some(spec) = set.fields.get(name) {
            return Found::Known(Some(spec));
        }
        let (code, suffix) = if set.additional_properties {
            let warning = match code {
                Code::E0403 => Code::W0503,
                _ => Code::W0502,
            };
            (
                warning,
                " (additional properties are allowed, so it may still arrive)",
            )
        } else {
            (code, "")
        };
        let names = set.fields.keys().map(String::as_str).collect();
        self.report(
            code,
            span,
            format!("{what} is not in the tracking plan{suffix}"),
            name,
            names,
        );
        Found::Unknown
    }

    fn report(&mut self, code: Code, span: Span, message: String, name: &str, candidates: Vec<&str>) {
        let mut d = Diagnostic::new(code, span, message);
        if let Some(s) = did_you_mean(name, candidates) {
            d = d.with_hint(format!("did you mean `{s}`?"));
        }
        self.out.push(d);
    }

    /// Walks an expression; `event` is the event type whose `where` it is in.
    fn expr(&mut self, e: &Expr, event: Option<&Ident>) {
        match &e.kind {
            ExprKind::Lit(_) => {}
            ExprKind::List(items) => items.iter().for_each(|i| self.expr(i, event)),
            ExprKind::Profile(ident) | ExprKind::Has(ident) => {
                self.profile(ident);
            }
            ExprKind::Name(parts) => {
                if let Some(t) = event {
                    let (path, span) = dotted(parts);
                    self.property(t, &path, span);
                }
            }
            ExprKind::Agg(agg) => {
                if self.event_type(&agg.event_type) && !agg.property.is_empty() {
                    let (path, span) = dotted(&agg.property);
                    self.property(&agg.event_type, &path, span);
                }
                if let Some(f) = &agg.filter {
                    let known = match self.catalog {
                        Catalog::Plan(p) => p.event(&normalize(&agg.event_type.name)).is_some(),
                        Catalog::Observed { events, .. } => {
                            events.contains_key(&*normalize(&agg.event_type.name))
                        }
                    };
                    self.expr(f, known.then_some(&agg.event_type));
                }
            }
            ExprKind::Unary(_, inner) => self.expr(inner, event),
            ExprKind::Binary(op, left, right) => {
                let compares = op.compares();
                if compares {
                    if let Some(spec) = self.field_of(left, event) {
                        self.compared(*op, spec, right);
                        self.expr(right, event);
                        return;
                    }
                    if let Some(spec) = self.field_of(right, event) {
                        self.compared(*op, spec, left);
                        self.expr(left, event);
                        return;
                    }
                }
                self.expr(left, event);
                self.expr(right, event);
            }
        }
    }

    /// The planned spec of a property or attribute expression (reporting unknown names).
    fn field_of(&mut self, e: &Expr, event: Option<&Ident>) -> Option<&'a FieldSpec> {
        let found = match (&e.kind, event) {
            (ExprKind::Profile(ident), _) => self.profile(ident),
            (ExprKind::Name(parts), Some(t)) => {
                let (path, span) = dotted(parts);
                self.property(t, &path, span)
            }
            _ => return None,
        };
        match found {
            Found::Known(Some(spec)) => Some(spec),
            // Reported already, or no types to compare with: nothing more to say.
            Found::Known(None) | Found::Unknown => Some(&ANY),
        }
    }

    /// A comparison of a planned field with `other`: a literal of the wrong type, or
    /// outside the enum, is an error.
    fn compared(&mut self, op: BinaryOp, spec: &FieldSpec, other: &Expr) {
        let literals: Vec<(&Literal, Span)> = match (&other.kind, op) {
            (ExprKind::Lit(l), _) => vec![(l, other.span)],
            (ExprKind::List(items), BinaryOp::In) => items
                .iter()
                .filter_map(|i| match &i.kind {
                    ExprKind::Lit(l) => Some((l, i.span)),
                    _ => None,
                })
                .collect(),
            _ => return,
        };
        for (literal, span) in literals {
            let value = match literal {
                Literal::Num(n) => Value::Num(*n),
                Literal::Str(s) => Value::str(s),
                Literal::Bool(b) => Value::Bool(*b),
                Literal::Dur(d) => Value::Dur(*d),
                Literal::Null => continue,
            };
            let fits = match spec.kind {
                FieldType::Any => true,
                FieldType::Timestamp => matches!(value, Value::Num(_) | Value::Str(_)),
                FieldType::Enum => {
                    if !spec.allows(&value) {
                        let allowed: Vec<String> = spec.values.iter().map(|v| v.to_string()).collect();
                        self.out.push(
                            Diagnostic::new(
                                Code::E0405,
                                span,
                                format!("{value} is not one of the planned values"),
                            )
                            .with_hint(format!("the plan allows [{}]", allowed.join(", "))),
                        );
                    }
                    continue;
                }
                kind => {
                    let wanted = kind.rule_type();
                    value.type_of() == wanted
                        || (wanted == Type::Num
                            && kind == FieldType::Integer
                            && matches!(value, Value::Num(_)))
                }
            };
            if !fits {
                self.out.push(Diagnostic::new(
                    Code::E0404,
                    span,
                    format!(
                        "compared with a {} ({value}), but the plan says {}",
                        value.type_of(),
                        spec.kind.name()
                    ),
                ));
            }
        }
    }
}

/// A field of any type: what an unplanned or untyped name compares as.
static ANY: FieldSpec = FieldSpec {
    kind: FieldType::Any,
    required: false,
    values: Vec::new(),
    pattern: None,
    max_length: None,
    description: None,
};

fn dotted(parts: &[Ident]) -> (String, Span) {
    let path = parts
        .iter()
        .map(|p| p.name.as_str())
        .collect::<Vec<_>>()
        .join(".");
    let span = Span::new(
        parts.first().map_or(0, |p| p.span.start),
        parts.last().map_or(0, |p| p.span.end),
    );
    (path, span)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = r#"
[events.view]
additional_properties = false
properties.category = { type = "string" }
properties.page = { type = "string" }

[events.payment]
properties.amount = { type = "decimal" }
properties.channel = { type = "enum", values = ["app", "shop"] }

[profile]
additional_properties = false
attributes.city = { type = "string" }
attributes.vip = { type = "bool" }
"#;

    /// (code, line, column, hint) of each diagnostic, for golden comparisons.
    fn diagnose(rules: &str, catalog: &Catalog<'_>) -> Vec<(String, usize, usize, Option<String>)> {
        check_rules_against(rules, catalog)
            .into_iter()
            .map(|d| {
                let p = d.position(rules);
                (d.code.as_str().to_owned(), p.line, p.column, d.hint)
            })
            .collect()
    }

    fn plan() -> TrackingPlan {
        TrackingPlan::parse(PLAN).unwrap()
    }

    #[test]
    fn typos_in_event_types_properties_and_attributes_are_errors_with_a_suggestion() {
        let rules = "tag t on veiw where categroy == \"x\"\n\
                     trait s = sum(payment.amout, 30d)\n\
                     tag v = profile.vipp == true and count(view where pgae == \"home\", 7d) > 1\n";
        let hint = |s: &str| Some(format!("did you mean `{s}`?"));
        assert_eq!(
            diagnose(rules, &Catalog::Plan(&plan())),
            [
                ("E0401".into(), 1, 10, hint("view")),
                ("W0502".into(), 2, 23, hint("amount")),
                ("E0403".into(), 3, 17, hint("vip")),
                ("E0402".into(), 3, 51, hint("page")),
            ]
        );
    }

    #[test]
    fn comparisons_with_the_wrong_type_or_outside_the_enum_are_errors() {
        let rules = "tag a on view where category == 3\n\
                     tag b = profile.vip == \"yes\"\n\
                     tag c = count(payment where channel in [\"app\", \"wechat\"], 7d) > 0\n\
                     tag d = profile.city == \"杭州\" and sum(payment.amount where amount > 10, 7d) > 0\n";
        let found: Vec<(String, usize, usize)> = diagnose(rules, &Catalog::Plan(&plan()))
            .into_iter()
            .map(|(c, l, col, _)| (c, l, col))
            .collect();
        assert_eq!(
            found,
            [
                ("E0404".into(), 1, 33),
                ("E0404".into(), 2, 24),
                ("E0405".into(), 3, 48)
            ]
        );
    }

    #[test]
    fn without_a_plan_what_was_never_received_is_a_warning() {
        let events: BTreeMap<String, Vec<String>> = [("view".to_owned(), vec!["category".to_owned()])]
            .into_iter()
            .collect();
        let profile = vec!["city".to_owned()];
        let catalog = Catalog::Observed {
            events: &events,
            profile: &profile,
        };
        let expr = check_expr_against("profile.cty == \"y\" and count(veiw, 7d) > 0", &catalog);
        let codes: Vec<&str> = expr.iter().map(|d| d.code.as_str()).collect();
        assert_eq!(codes, ["W0503", "W0501"], "a segment expression, spans within it");
        assert_eq!(
            expr[1]
                .position("profile.cty == \"y\" and count(veiw, 7d) > 0")
                .column,
            30
        );
        let rules = "tag t on veiw\ntag u on view where categroy == \"x\" and profile.cty == \"y\"\n";
        let found = check_rules_against(rules, &catalog);
        let codes: Vec<&str> = found.iter().map(|d| d.code.as_str()).collect();
        assert_eq!(codes, ["W0501", "W0502", "W0503"]);
        assert!(found.iter().all(|d| d.code.is_warning()));
        let rendered = crate::render_all(&found, rules, "rules.trl");
        assert!(
            rendered.starts_with("warning[W0501]: event type `veiw` has never been received"),
            "{rendered}"
        );
        assert!(
            rendered.ends_with("0 errors, 3 warnings in rules.trl\n"),
            "{rendered}"
        );
    }
}
