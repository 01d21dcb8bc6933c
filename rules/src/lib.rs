//! # The tagstream rule language
//!
//! Marketers and ops say what a tag means in a small language (see `docs/rules.md`):
//!
//! ```text
//! trait ltv_90d = sum(payment.amount, 90d)
//! tag viewed_seafood on view where category == "seafood" ttl 7d
//! tag lead_sla_breach = profile.lead_status == "new" and since(lead_created) > 45m
//! ```
//!
//! The key types, in the order data flows through them:
//!
//! - [`parse`] turns text into a [`RuleFile`] (the syntax tree, printable back to text);
//! - [`CompiledRules::compile`] checks names and types and returns either every
//!   [`Diagnostic`] at once or the compiled plan: definitions in evaluation order, the
//!   distinct [`AggSpec`]s they share, and which definitions each event type can change;
//! - the engine implements [`Facts`] (aggregate values, profile, other definitions, `now`)
//!   and calls [`CompiledRules::evaluate`] for the definitions an event can change, and
//!   [`CompiledRules::next_change`] to know when time alone could change something.
//!
//! [`CustomerHistory`] is the brute-force reference: every event kept, everything
//! recomputed. The engine's incremental state must agree with it.
//!
//! ```
//! use rules::{CompiledRules, CustomerHistory, Event, Props, Value, DEFAULT_RETENTION_MS};
//!
//! let rules = CompiledRules::compile(
//!     "tag lead_sla_breach = profile.lead_status == \"new\" and since(lead_created) > 45m",
//! ).unwrap();
//! let mut alice = CustomerHistory::new();
//! let lead = Event { event_type: "lead_created".into(), ts: 0, arrival: 0, props: Props::default() };
//! alice.push(lead, [("lead_status".into(), Some(Value::str("new")))]);
//!
//! let tag = rules.lookup("lead_sla_breach").unwrap();
//! let at_45m = alice.facts(&rules, 45 * 60_000, DEFAULT_RETENTION_MS);
//! assert!(!rules.evaluate(tag, &at_45m).is_true());
//! // The tag first holds one millisecond after 45 minutes, and the timer says so.
//! assert_eq!(rules.next_change(&at_45m), Some(45 * 60_000 + 1));
//! let later = alice.facts(&rules, 45 * 60_000 + 1, DEFAULT_RETENTION_MS);
//! assert!(rules.evaluate(tag, &later).is_true());
//! ```
//!
//! The crate is pure: no I/O, no async runtime, no storage.

pub mod aggregate;
pub mod ast;
pub mod compile;
pub mod diagnostic;
pub mod eval;
pub mod event;
pub mod explain;
pub mod history;
pub mod lexer;
pub mod normalize;
pub mod parser;
pub mod plan;
pub mod plan_check;
mod timing;
pub mod value;

pub use aggregate::Accumulator;
pub use ast::{AggFunc, RuleFile, Window};
pub use compile::{
    AggId, AggSource, AggSpec, CompiledDef, CompiledRules, DefId, DefKind, EventTagSpec, Node,
};
pub use diagnostic::{render_all, Code, Diagnostic, LocatedDiagnostic, Position, Span};
pub use eval::{apply_binary, filter_matches, Band, Facts};
pub use event::{Event, ProfileUpdate, Props};
pub use explain::{ExplainNode, WindowBounds};
pub use history::{CustomerHistory, HistoryFacts, ProfileEntry, DEFAULT_RETENTION_MS};
pub use normalize::normalize;
pub use parser::{parse, parse_expr};
pub use plan::{Mode, TrackingPlan, Verdict, Violation, ViolationClass};
pub use plan_check::{check_against_plan, check_expr_against, check_rules_against, Catalog};
pub use value::{exact_add, parse_exact_decimal, NumberError, Type, Value};
