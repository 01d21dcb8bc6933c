//! The syntax tree of a rule file, and a printer whose output parses back to the same tree.

use std::fmt;

use rust_decimal::Decimal;

use crate::diagnostic::Span;

#[derive(Debug, Clone, PartialEq)]
pub struct RuleFile {
    pub defs: Vec<Def>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

impl Ident {
    pub fn new(name: impl Into<String>) -> Ident {
        Ident {
            name: name.into(),
            span: Span::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Def {
    pub name: Ident,
    pub body: DefBody,
    /// The whole definition, keyword to last token.
    pub span: Span,
    /// The span of the keyword (`trait`, `tag`, `segment`).
    pub keyword_span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DefBody {
    Trait(Expr),
    /// `tag NAME = EXPR`; a `ttl` written after it is kept to be reported by the checker.
    ConditionTag {
        expr: Expr,
        ttl: Option<(i64, Span)>,
    },
    EventTag {
        event_type: Ident,
        filter: Option<Expr>,
        ttl: Option<(i64, Span)>,
    },
    Segment(Expr),
}

impl DefBody {
    pub fn keyword(&self) -> &'static str {
        match self {
            DefBody::Trait(_) => "trait",
            DefBody::ConditionTag { .. } | DefBody::EventTag { .. } => "tag",
            DefBody::Segment(_) => "segment",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Num(Decimal),
    Str(String),
    Bool(bool),
    Null,
    Dur(i64),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    Lit(Literal),
    List(Vec<Expr>),
    /// `profile.NAME` (a dotted name after `profile.` is one attribute name `a.b`).
    Profile(Ident),
    /// `has(profile.NAME)`.
    Has(Ident),
    /// A bare or dotted name: a definition outside `where`, an event property inside.
    Name(Vec<Ident>),
    Agg(Box<Aggregate>),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    Not,
    Neg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    Contains,
    StartsWith,
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Or => "or",
            BinaryOp::And => "and",
            BinaryOp::Eq => "==",
            BinaryOp::Ne => "!=",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::In => "in",
            BinaryOp::Contains => "contains",
            BinaryOp::StartsWith => "starts_with",
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
        }
    }

    /// `== != < <= > >= in`: compares two values (`contains` and `starts_with`, of the same
    /// precedence, look inside one).
    pub fn compares(self) -> bool {
        self.is_comparison() && !matches!(self, BinaryOp::Contains | BinaryOp::StartsWith)
    }

    /// Binding strength: `or < and < not < comparisons < + - < * /`.
    pub fn precedence(self) -> u8 {
        match self {
            BinaryOp::Or => 1,
            BinaryOp::And => 2,
            BinaryOp::Eq
            | BinaryOp::Ne
            | BinaryOp::Lt
            | BinaryOp::Le
            | BinaryOp::Gt
            | BinaryOp::Ge
            | BinaryOp::In
            | BinaryOp::Contains
            | BinaryOp::StartsWith => 4,
            BinaryOp::Add | BinaryOp::Sub => 5,
            BinaryOp::Mul | BinaryOp::Div => 6,
        }
    }

    pub fn is_comparison(self) -> bool {
        self.precedence() == 4
    }
}

const NOT_PRECEDENCE: u8 = 3;
const UNARY_MINUS_PRECEDENCE: u8 = 7;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AggFunc {
    Count,
    Sum,
    Avg,
    Min,
    Max,
    Distinct,
    Last,
    First,
    Since,
}

impl AggFunc {
    pub fn from_name(name: &str) -> Option<AggFunc> {
        Some(match name {
            "count" => AggFunc::Count,
            "sum" => AggFunc::Sum,
            "avg" => AggFunc::Avg,
            "min" => AggFunc::Min,
            "max" => AggFunc::Max,
            "distinct" => AggFunc::Distinct,
            "last" => AggFunc::Last,
            "first" => AggFunc::First,
            "since" => AggFunc::Since,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            AggFunc::Count => "count",
            AggFunc::Sum => "sum",
            AggFunc::Avg => "avg",
            AggFunc::Min => "min",
            AggFunc::Max => "max",
            AggFunc::Distinct => "distinct",
            AggFunc::Last => "last",
            AggFunc::First => "first",
            AggFunc::Since => "since",
        }
    }

    /// Aggregates over a window (`count sum avg min max distinct`) need one.
    pub fn takes_window(self) -> bool {
        !matches!(self, AggFunc::Last | AggFunc::First | AggFunc::Since)
    }

    /// Aggregates that read a property (`sum(payment.amount, ...)`).
    pub fn takes_property(self) -> bool {
        !matches!(self, AggFunc::Count | AggFunc::Since)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    /// Events with `now - ms < ts <= now`.
    Span(i64),
    /// Every retained event with `ts <= now`.
    Lifetime,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub func: AggFunc,
    pub func_span: Span,
    pub event_type: Ident,
    /// The property path after the event type (`payment.item.price` → `[item, price]`).
    pub property: Vec<Ident>,
    pub filter: Option<Expr>,
    pub window: Option<(Window, Span)>,
}

/// Writes `s` as a rule-language string literal.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || crate::normalize::is_format_char(c) => {
                out.push_str(&format!("\\u{{{:X}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes milliseconds with the largest unit that divides them: `45m`, `500ms`.
pub fn format_duration(ms: i64) -> String {
    for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms != 0 && ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

fn is_plain_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(crate::lexer::is_ident_start) && chars.all(crate::lexer::is_ident_continue)
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Num(n) if n.is_sign_negative() => write!(f, "-{}", n.abs()),
            Literal::Num(n) => write!(f, "{n}"),
            Literal::Str(s) => f.write_str(&quote(s)),
            Literal::Bool(b) => write!(f, "{b}"),
            Literal::Null => f.write_str("null"),
            Literal::Dur(ms) if *ms < 0 => write!(f, "-{}", format_duration(-ms)),
            Literal::Dur(ms) => f.write_str(&format_duration(*ms)),
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Window::Span(ms) => f.write_str(&format_duration(*ms)),
            Window::Lifetime => f.write_str("lifetime"),
        }
    }
}

impl fmt::Display for Aggregate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({}", self.func.name(), self.event_type.name)?;
        for part in &self.property {
            write!(f, ".{}", part.name)?;
        }
        if let Some(filter) = &self.filter {
            write!(f, " where {filter}")?;
        }
        if let Some((window, _)) = &self.window {
            write!(f, ", {window}")?;
        }
        f.write_str(")")
    }
}

impl Expr {
    fn precedence(&self) -> u8 {
        match &self.kind {
            ExprKind::Binary(op, _, _) => op.precedence(),
            ExprKind::Unary(UnaryOp::Not, _) => NOT_PRECEDENCE,
            ExprKind::Unary(UnaryOp::Neg, _) => UNARY_MINUS_PRECEDENCE,
            ExprKind::Lit(Literal::Num(n)) if n.is_sign_negative() => UNARY_MINUS_PRECEDENCE,
            ExprKind::Lit(Literal::Dur(ms)) if *ms < 0 => UNARY_MINUS_PRECEDENCE,
            _ => u8::MAX,
        }
    }

    fn write_child(&self, f: &mut fmt::Formatter<'_>, min: u8) -> fmt::Result {
        if self.precedence() < min {
            write!(f, "({self})")
        } else {
            write!(f, "{self}")
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ExprKind::Lit(lit) => write!(f, "{lit}"),
            ExprKind::List(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
            ExprKind::Profile(name) => write!(f, "profile.{}", name.name),
            ExprKind::Has(name) => write!(f, "has(profile.{})", name.name),
            ExprKind::Name(parts) => {
                for (i, part) in parts.iter().enumerate() {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    f.write_str(&part.name)?;
                }
                Ok(())
            }
            ExprKind::Agg(agg) => write!(f, "{agg}"),
            ExprKind::Unary(UnaryOp::Not, inner) => {
                f.write_str("not ")?;
                inner.write_child(f, NOT_PRECEDENCE)
            }
            ExprKind::Unary(UnaryOp::Neg, inner) => {
                // `-(5)` keeps a negated literal apart from the literal `-5`.
                let literal = matches!(inner.kind, ExprKind::Lit(Literal::Num(_) | Literal::Dur(_)));
                if literal || inner.precedence() < UNARY_MINUS_PRECEDENCE {
                    write!(f, "-({inner})")
                } else {
                    write!(f, "-{inner}")
                }
            }
            ExprKind::Binary(op, lhs, rhs) => {
                let p = op.precedence();
                // Left-associative arithmetic and logic; comparisons do not chain.
                let (left_min, right_min) = if op.is_comparison() {
                    (p + 1, p + 1)
                } else {
                    (p, p + 1)
                };
                lhs.write_child(f, left_min)?;
                write!(f, " {} ", op.symbol())?;
                rhs.write_child(f, right_min)
            }
        }
    }
}

impl fmt::Display for Def {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = &self.name.name;
        debug_assert!(is_plain_name(name));
        match &self.body {
            DefBody::Trait(e) => write!(f, "trait {name} = {e}"),
            DefBody::ConditionTag { expr, ttl } => {
                write!(f, "tag {name} = {expr}")?;
                if let Some((ms, _)) = ttl {
                    write!(f, " ttl {}", format_duration(*ms))?;
                }
                Ok(())
            }
            DefBody::EventTag {
                event_type,
                filter,
                ttl,
            } => {
                write!(f, "tag {name} on {}", event_type.name)?;
                if let Some(p) = filter {
                    write!(f, " where {p}")?;
                }
                if let Some((ms, _)) = ttl {
                    write!(f, " ttl {}", format_duration(*ms))?;
                }
                Ok(())
            }
            DefBody::Segment(e) => write!(f, "segment {name} = {e}"),
        }
    }
}

impl fmt::Display for RuleFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for def in &self.defs {
            writeln!(f, "{def}")?;
        }
        Ok(())
    }
}

/// Clears every span, so trees parsed from different texts compare by structure.
pub trait WithoutSpans {
    fn without_spans(&self) -> Self;
}

impl WithoutSpans for RuleFile {
    fn without_spans(&self) -> Self {
        RuleFile {
            defs: self.defs.iter().map(WithoutSpans::without_spans).collect(),
        }
    }
}

impl WithoutSpans for Ident {
    fn without_spans(&self) -> Self {
        Ident::new(self.name.clone())
    }
}

impl WithoutSpans for Def {
    fn without_spans(&self) -> Self {
        let ttl = |t: &Option<(i64, Span)>| t.map(|(ms, _)| (ms, Span::default()));
        Def {
            name: self.name.without_spans(),
            body: match &self.body {
                DefBody::Trait(e) => DefBody::Trait(e.without_spans()),
                DefBody::ConditionTag { expr, ttl: t } => DefBody::ConditionTag {
                    expr: expr.without_spans(),
                    ttl: ttl(t),
                },
                DefBody::EventTag {
                    event_type,
                    filter,
                    ttl: t,
                } => DefBody::EventTag {
                    event_type: event_type.without_spans(),
                    filter: filter.as_ref().map(WithoutSpans::without_spans),
                    ttl: ttl(t),
                },
                DefBody::Segment(e) => DefBody::Segment(e.without_spans()),
            },
            span: Span::default(),
            keyword_span: Span::default(),
        }
    }
}

impl WithoutSpans for Expr {
    fn without_spans(&self) -> Self {
        let kind = match &self.kind {
            ExprKind::Lit(l) => ExprKind::Lit(l.clone()),
            ExprKind::List(items) => ExprKind::List(items.iter().map(WithoutSpans::without_spans).collect()),
            ExprKind::Profile(i) => ExprKind::Profile(i.without_spans()),
            ExprKind::Has(i) => ExprKind::Has(i.without_spans()),
            ExprKind::Name(parts) => ExprKind::Name(parts.iter().map(WithoutSpans::without_spans).collect()),
            ExprKind::Agg(a) => ExprKind::Agg(Box::new(Aggregate {
                func: a.func,
                func_span: Span::default(),
                event_type: a.event_type.without_spans(),
                property: a.property.iter().map(WithoutSpans::without_spans).collect(),
                filter: a.filter.as_ref().map(WithoutSpans::without_spans),
                window: a.window.map(|(w, _)| (w, Span::default())),
            })),
            ExprKind::Unary(op, e) => ExprKind::Unary(*op, Box::new(e.without_spans())),
            ExprKind::Binary(op, l, r) => {
                ExprKind::Binary(*op, Box::new(l.without_spans()), Box::new(r.without_spans()))
            }
        };
        Expr {
            kind,
            span: Span::default(),
        }
    }
}
