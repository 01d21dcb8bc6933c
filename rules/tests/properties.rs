//! Property tests: the parser never panics; printing a tree and parsing it back gives the
//! same tree; `next_change` is never late.

use proptest::prelude::*;
use rust_decimal::Decimal;

use rules::ast::*;
use rules::{parse, render_all, CompiledRules, CustomerHistory, Event, Props, Value, DEFAULT_RETENTION_MS};

const VOCABULARY: &[&str] = &[
    "trait",
    "tag",
    "segment",
    "on",
    "where",
    "ttl",
    "and",
    "or",
    "not",
    "in",
    "contains",
    "starts_with",
    "true",
    "false",
    "null",
    "lifetime",
    "profile",
    ".",
    "has",
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "distinct",
    "last",
    "first",
    "since",
    "(",
    ")",
    "[",
    "]",
    ",",
    "=",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "+",
    "-",
    "*",
    "/",
    "payment",
    "amount",
    "x",
    "高价值",
    "\"杭州\"",
    "\"unterminated",
    "30d",
    "45m",
    "7w",
    "66333333666666663333333333332d",
    "99999999999999999999999999999",
    "1e9",
    "0.5ms",
    "12",
    "3.25",
    "#",
    "\n",
    "&&",
    "（",
    "'",
    "\\",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn compiling_arbitrary_text_never_panics(source in "\\PC{0,200}") {
        if let Err(diags) = CompiledRules::compile(&source) {
            let _ = render_all(&diags, &source, "fuzz");
        }
    }

    #[test]
    fn compiling_token_soup_never_panics(words in prop::collection::vec(prop::sample::select(VOCABULARY), 0..60)) {
        let source = words.join(" ");
        match CompiledRules::compile(&source) {
            Err(diags) => {
                prop_assert!(!diags.is_empty());
                for d in &diags {
                    prop_assert!(d.span.start <= d.span.end && d.span.end <= source.len());
                    let _ = d.render(&source, "soup");
                }
            }
            Ok(rules) => {
                let _ = rules.describe_plan();
            }
        }
    }

    #[test]
    fn printing_a_tree_parses_back_to_the_same_tree(file in rule_file()) {
        let printed = file.to_string();
        let (reparsed, diags) = parse(&printed);
        prop_assert!(diags.is_empty(), "{printed}\n{diags:?}");
        prop_assert_eq!(reparsed.without_spans(), file.without_spans(), "{}", printed);
    }
}

fn ident(pool: &'static [&'static str]) -> impl Strategy<Value = Ident> {
    prop::sample::select(pool).prop_map(Ident::new)
}

const NAMES: &[&str] = &["a", "b_1", "高价值", "churn_risk", "x9", "_p"];
const TYPES: &[&str] = &["payment", "view", "app_open", "打开应用"];
const PROPS: &[&str] = &["amount", "device", "os", "类别"];

fn expr_of(kind: ExprKind) -> Expr {
    Expr {
        kind,
        span: Default::default(),
    }
}

fn literal() -> impl Strategy<Value = Literal> {
    prop_oneof![
        (-1_000_000i64..1_000_000, 0u32..4).prop_map(|(m, s)| Literal::Num(Decimal::new(m, s))),
        "[a-z 杭州\"\\\\\u{200b}\t]{0,8}".prop_map(Literal::Str),
        any::<bool>().prop_map(Literal::Bool),
        Just(Literal::Null),
        (1i64..100_000_000_000).prop_map(Literal::Dur),
    ]
}

fn aggregate(inner: BoxedStrategy<Expr>) -> impl Strategy<Value = Expr> {
    let funcs = [
        AggFunc::Count,
        AggFunc::Sum,
        AggFunc::Avg,
        AggFunc::Min,
        AggFunc::Max,
        AggFunc::Distinct,
        AggFunc::Last,
        AggFunc::First,
        AggFunc::Since,
    ];
    (
        prop::sample::select(funcs.to_vec()),
        ident(TYPES),
        prop::collection::vec(ident(PROPS), 0..3),
        prop::option::of(inner),
        prop_oneof![
            (1i64..10_000_000_000).prop_map(Window::Span),
            Just(Window::Lifetime)
        ],
        any::<bool>(),
    )
        .prop_map(|(func, event_type, property, filter, window, with_window)| {
            expr_of(ExprKind::Agg(Box::new(Aggregate {
                func,
                func_span: Default::default(),
                event_type,
                property,
                filter,
                window: with_window.then_some((window, Default::default())),
            })))
        })
}

fn expr() -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![
        literal().prop_map(|l| expr_of(ExprKind::Lit(l))),
        ident(PROPS).prop_map(|i| expr_of(ExprKind::Profile(i))),
        ident(PROPS).prop_map(|i| expr_of(ExprKind::Has(i))),
        prop::collection::vec(ident(NAMES), 1..3).prop_map(|p| expr_of(ExprKind::Name(p))),
    ];
    leaf.prop_recursive(5, 48, 4, |inner| {
        let ops = [
            BinaryOp::Or,
            BinaryOp::And,
            BinaryOp::Eq,
            BinaryOp::Ne,
            BinaryOp::Lt,
            BinaryOp::Le,
            BinaryOp::Gt,
            BinaryOp::Ge,
            BinaryOp::In,
            BinaryOp::Contains,
            BinaryOp::StartsWith,
            BinaryOp::Add,
            BinaryOp::Sub,
            BinaryOp::Mul,
            BinaryOp::Div,
        ];
        prop_oneof![
            (prop::sample::select(ops.to_vec()), inner.clone(), inner.clone())
                .prop_map(|(op, l, r)| { expr_of(ExprKind::Binary(op, Box::new(l), Box::new(r))) }),
            inner
                .clone()
                .prop_map(|e| expr_of(ExprKind::Unary(UnaryOp::Not, Box::new(e)))),
            inner
                .clone()
                .prop_map(|e| expr_of(ExprKind::Unary(UnaryOp::Neg, Box::new(e)))),
            prop::collection::vec(inner.clone(), 0..3).prop_map(|items| expr_of(ExprKind::List(items))),
            aggregate(inner.boxed()),
        ]
    })
}

fn def() -> impl Strategy<Value = Def> {
    let ttl = prop::option::of((1i64..10_000_000_000).prop_map(|ms| (ms, Default::default())));
    (
        ident(NAMES),
        0u8..4,
        expr(),
        ident(TYPES),
        prop::option::of(expr()),
        ttl,
    )
        .prop_map(|(name, kind, e, event_type, filter, ttl)| {
            let body = match kind {
                0 => DefBody::Trait(e),
                1 => DefBody::ConditionTag { expr: e, ttl: None },
                2 => DefBody::EventTag {
                    event_type,
                    filter,
                    ttl,
                },
                _ => DefBody::Segment(e),
            };
            Def {
                name,
                body,
                span: Default::default(),
                keyword_span: Default::default(),
            }
        })
}

fn rule_file() -> impl Strategy<Value = RuleFile> {
    prop::collection::vec(def(), 0..5).prop_map(|defs| RuleFile { defs })
}

// ---- next_change is never late ----

const TIMED_RULES: &str = r#"
tag a = count(view, 1h) >= 2
tag b = since(call) > 30m and count(call, lifetime) >= 1
tag c on view where category == "x" ttl 45m
tag d = sum(payment.amount, 2h) >= 100 or not a
trait q = since(call) / 1m
tag e = q >= 90 and q < 120
tag f = since(view where category == "x") in [10m, 20m]
segment s = a and not c
"#;

const MIN: i64 = 60_000;

fn timed_event() -> impl Strategy<Value = (u8, i64, bool, u8)> {
    (0u8..3, 0i64..(6 * 60 * MIN), any::<bool>(), 0u8..80)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn next_change_is_never_late(events in prop::collection::vec(timed_event(), 0..12), now in 0i64..(8 * 60 * MIN), probes in prop::collection::vec(0.0f64..1.0, 4)) {
        let rules = CompiledRules::compile(TIMED_RULES).unwrap();
        let mut history = CustomerHistory::new();
        for (i, (kind, ts, flag, amount)) in events.into_iter().enumerate() {
            let (event_type, props) = match kind {
                0 => ("view", format!(r#"{{"category": "{}"}}"#, if flag { "x" } else { "y" })),
                1 => ("call", "{}".to_owned()),
                _ => ("payment", format!(r#"{{"amount": {amount}}}"#)),
            };
            let json: serde_json::Value = serde_json::from_str(&props).unwrap();
            history.push(
                Event { event_type: event_type.into(), ts, arrival: i as u64, props: Props::from_json(json.as_object().unwrap()) },
                [],
            );
        }
        let members = |t: i64| -> Vec<Value> {
            let facts = history.facts(&rules, t, DEFAULT_RETENTION_MS);
            rules
                .evaluate_all(&facts)
                .into_iter()
                .zip(rules.defs())
                .filter(|(_, d)| d.kind.has_members())
                .map(|(v, _)| v)
                .collect()
        };
        let at_now = members(now);
        let next = rules.next_change(&history.facts(&rules, now, DEFAULT_RETENTION_MS));
        let horizon = next.unwrap_or(now + 24 * 60 * MIN);
        prop_assert!(horizon > now);
        let mut instants: Vec<i64> = probes.iter().map(|p| now + 1 + ((horizon - now - 1) as f64 * p) as i64).collect();
        instants.push(horizon - 1);
        for t in instants.into_iter().filter(|t| *t > now && *t < horizon) {
            prop_assert_eq!(&members(t), &at_now, "membership changed at {} before next_change {:?} (now {})", t, next, now);
        }
    }
}
