//! Recursive-descent parser. Precedence, loosest first:
//! `or` < `and` < `not` < comparisons, `in`, `contains`, `starts_with` < `+ -` < `* /` < unary `-`.
//!
//! On an error the parser records a diagnostic and resumes at the next definition keyword,
//! so one run reports the problems of every definition.

use crate::ast::*;
use crate::diagnostic::{did_you_mean, Code, Diagnostic, Span};
use crate::lexer::{is_reserved, lex, Kw, Tok, Token, AGGREGATE_NAMES};

/// Parses a whole rule file. Diagnostics cover lexing and syntax; the tree holds every
/// definition that parsed.
pub fn parse(source: &str) -> (RuleFile, Vec<Diagnostic>) {
    let (tokens, mut diags) = lex(source);
    let mut parser = Parser {
        tokens,
        pos: 0,
        diags: Vec::new(),
    };
    let file = parser.file();
    diags.append(&mut parser.diags);
    diags.sort_by_key(|d| d.span.start);
    (file, diags)
}

/// Parses one expression (ad-hoc segment queries, `where` previews).
pub fn parse_expr(source: &str) -> Result<Expr, Vec<Diagnostic>> {
    let (tokens, mut diags) = lex(source);
    let mut parser = Parser {
        tokens,
        pos: 0,
        diags: Vec::new(),
    };
    let expr = parser.expr();
    match expr {
        Ok(e) if parser.at(&Tok::Eof) => {
            diags.append(&mut parser.diags);
            if diags.is_empty() {
                return Ok(e);
            }
        }
        Ok(_) => {
            let t = parser.peek().clone();
            diags.push(Diagnostic::new(
                Code::E0101,
                t.span,
                format!(
                    "expected an operator or the end of the expression, found {}",
                    t.tok.describe()
                ),
            ));
        }
        Err(d) => diags.push(d),
    }
    diags.sort_by_key(|d| d.span.start);
    Err(diags)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    diags: Vec<Diagnostic>,
}

type PResult<T> = Result<T, Diagnostic>;

impl Parser {
    fn peek(&self) -> &Token {
        &self.tokens[self.pos]
    }

    fn peek_at(&self, ahead: usize) -> &Tok {
        &self.tokens[(self.pos + ahead).min(self.tokens.len() - 1)].tok
    }

    fn at(&self, tok: &Tok) -> bool {
        &self.peek().tok == tok
    }

    fn at_kw(&self, kw: Kw) -> bool {
        self.at(&Tok::Kw(kw))
    }

    fn bump(&mut self) -> Token {
        let t = self.tokens[self.pos].clone();
        if self.pos < self.tokens.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn prev_end(&self) -> usize {
        self.tokens[self.pos.saturating_sub(1)].span.end
    }

    fn expect(&mut self, tok: Tok, what: &str) -> PResult<Token> {
        if self.at(&tok) {
            Ok(self.bump())
        } else {
            Err(self.unexpected(what))
        }
    }

    fn unexpected(&self, what: &str) -> Diagnostic {
        let t = self.peek();
        let mut d = Diagnostic::new(
            Code::E0101,
            t.span,
            format!("expected {what}, found {}", t.tok.describe()),
        );
        match &t.tok {
            Tok::Assign => d = d.with_hint("compare with `==`; a single `=` only starts a definition"),
            Tok::Num(_) if what.contains("window") => {
                d = d.with_hint("give the window a unit, like `30d`, or write `lifetime`")
            }
            _ => {}
        }
        d
    }

    fn at_def_start(&self) -> bool {
        matches!(
            self.peek().tok,
            Tok::Kw(Kw::Trait | Kw::Tag | Kw::Segment) | Tok::Eof
        )
    }

    fn file(&mut self) -> RuleFile {
        let mut defs = Vec::new();
        while !self.at(&Tok::Eof) {
            match self.def() {
                Ok(def) => {
                    defs.push(def);
                    if !self.at_def_start() {
                        let t = self.peek();
                        let hint = if t.tok == Tok::Assign {
                            "compare with `==`; a single `=` only starts a definition"
                        } else {
                            "join conditions with `and` / `or`; start a definition with `trait`, `tag` or `segment`"
                        };
                        self.diags.push(
                            Diagnostic::new(
                                Code::E0101,
                                t.span,
                                format!(
                                    "expected an operator or a new definition, found {}",
                                    t.tok.describe()
                                ),
                            )
                            .with_hint(hint),
                        );
                        self.recover();
                    }
                }
                Err(d) => {
                    self.diags.push(d);
                    self.recover();
                }
            }
        }
        RuleFile { defs }
    }

    /// Skips to the next definition keyword.
    fn recover(&mut self) {
        while !self.at_def_start() {
            self.bump();
        }
    }

    fn def(&mut self) -> PResult<Def> {
        let kw = self.bump();
        let keyword = match kw.tok {
            Tok::Kw(k @ (Kw::Trait | Kw::Tag | Kw::Segment)) => k,
            _ => {
                return Err(Diagnostic::new(
                    Code::E0101,
                    kw.span,
                    format!(
                        "expected a definition (`trait`, `tag` or `segment`), found {}",
                        kw.tok.describe()
                    ),
                ))
            }
        };
        let name = self.def_name()?;
        let body = match keyword {
            Kw::Tag if self.at_kw(Kw::On) => {
                self.bump();
                let event_type = self.event_type("an event type after `on`")?;
                let filter = if self.at_kw(Kw::Where) {
                    self.bump();
                    Some(self.expr()?)
                } else {
                    None
                };
                let ttl = self.ttl()?;
                DefBody::EventTag {
                    event_type,
                    filter,
                    ttl,
                }
            }
            _ => {
                if !self.at(&Tok::Assign) {
                    let mut d = self.unexpected("`=`");
                    if keyword == Kw::Tag {
                        d = d.with_hint("a tag is `tag NAME = CONDITION` or `tag NAME on EVENT_TYPE [where ...] [ttl ...]`");
                    }
                    return Err(d);
                }
                self.bump();
                let expr = self.expr()?;
                match keyword {
                    Kw::Trait => DefBody::Trait(expr),
                    Kw::Tag => DefBody::ConditionTag {
                        ttl: self.ttl()?,
                        expr,
                    },
                    _ => DefBody::Segment(expr),
                }
            }
        };
        Ok(Def {
            name,
            body,
            span: Span::new(kw.span.start, self.prev_end()),
            keyword_span: kw.span,
        })
    }

    fn def_name(&mut self) -> PResult<Ident> {
        let t = self.peek().clone();
        let name = match &t.tok {
            Tok::Ident(n) => n.clone(),
            Tok::Kw(k) => k.as_str().to_owned(),
            _ => return Err(self.unexpected("a name")),
        };
        self.bump();
        if is_reserved(&name) {
            self.diags.push(
                Diagnostic::new(
                    Code::E0102,
                    t.span,
                    format!("`{name}` is a reserved word and cannot name a definition"),
                )
                .with_hint(format!("choose another name, like `{name}_30d` or `my_{name}`")),
            );
        }
        Ok(Ident { name, span: t.span })
    }

    fn event_type(&mut self, what: &str) -> PResult<Ident> {
        match self.peek().tok.clone() {
            Tok::Ident(name) => {
                let t = self.bump();
                Ok(Ident { name, span: t.span })
            }
            _ => Err(self.unexpected(what)),
        }
    }

    fn ttl(&mut self) -> PResult<Option<(i64, Span)>> {
        if !self.at_kw(Kw::Ttl) {
            return Ok(None);
        }
        self.bump();
        match self.peek().tok {
            Tok::Dur(ms) => {
                let t = self.bump();
                Ok(Some((ms, t.span)))
            }
            Tok::Num(_) => Err(self
                .unexpected("a duration after `ttl`")
                .with_hint("give the ttl a unit, like `7d`")),
            _ => Err(self.unexpected("a duration after `ttl`")),
        }
    }

    pub fn expr(&mut self) -> PResult<Expr> {
        self.or()
    }

    fn binary(op: BinaryOp, lhs: Expr, rhs: Expr) -> Expr {
        let span = lhs.span.to(rhs.span);
        Expr {
            kind: ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)),
            span,
        }
    }

    fn or(&mut self) -> PResult<Expr> {
        let mut lhs = self.and()?;
        while self.at_kw(Kw::Or) {
            self.bump();
            let rhs = self.and()?;
            lhs = Self::binary(BinaryOp::Or, lhs, rhs);
        }
        Ok(lhs)
    }

    fn and(&mut self) -> PResult<Expr> {
        let mut lhs = self.not()?;
        while self.at_kw(Kw::And) {
            self.bump();
            let rhs = self.not()?;
            lhs = Self::binary(BinaryOp::And, lhs, rhs);
        }
        Ok(lhs)
    }

    fn not(&mut self) -> PResult<Expr> {
        if self.at_kw(Kw::Not) {
            let t = self.bump();
            let inner = self.not()?;
            let span = t.span.to(inner.span);
            return Ok(Expr {
                kind: ExprKind::Unary(UnaryOp::Not, Box::new(inner)),
                span,
            });
        }
        self.comparison()
    }

    fn comparison_op(&self) -> Option<BinaryOp> {
        Some(match self.peek().tok {
            Tok::Eq => BinaryOp::Eq,
            Tok::Ne => BinaryOp::Ne,
            Tok::Lt => BinaryOp::Lt,
            Tok::Le => BinaryOp::Le,
            Tok::Gt => BinaryOp::Gt,
            Tok::Ge => BinaryOp::Ge,
            Tok::Kw(Kw::In) => BinaryOp::In,
            Tok::Kw(Kw::Contains) => BinaryOp::Contains,
            Tok::Kw(Kw::StartsWith) => BinaryOp::StartsWith,
            _ => return None,
        })
    }

    fn comparison(&mut self) -> PResult<Expr> {
        let lhs = self.additive()?;
        let Some(op) = self.comparison_op() else {
            return Ok(lhs);
        };
        self.bump();
        let rhs = self.additive()?;
        let expr = Self::binary(op, lhs, rhs);
        if self.comparison_op().is_some() {
            let t = self.peek().clone();
            return Err(
                Diagnostic::new(Code::E0103, expr.span.to(t.span), "comparisons cannot be chained")
                    .with_hint("write `a < b and b < c`, or add parentheses"),
            );
        }
        Ok(expr)
    }

    fn additive(&mut self) -> PResult<Expr> {
        let mut lhs = self.multiplicative()?;
        loop {
            let op = match self.peek().tok {
                Tok::Plus => BinaryOp::Add,
                Tok::Minus => BinaryOp::Sub,
                _ => return Ok(lhs),
            };
            self.bump();
            let rhs = self.multiplicative()?;
            lhs = Self::binary(op, lhs, rhs);
        }
    }

    fn multiplicative(&mut self) -> PResult<Expr> {
        let mut lhs = self.unary()?;
        loop {
            let op = match self.peek().tok {
                Tok::Star => BinaryOp::Mul,
                Tok::Slash => BinaryOp::Div,
                _ => return Ok(lhs),
            };
            self.bump();
            let rhs = self.unary()?;
            lhs = Self::binary(op, lhs, rhs);
        }
    }

    fn unary(&mut self) -> PResult<Expr> {
        if !self.at(&Tok::Minus) {
            return self.primary();
        }
        let minus = self.bump();
        // `-5` is a literal; `-(5)` and `-x` are negations.
        match self.peek().tok.clone() {
            Tok::Num(n) => {
                let t = self.bump();
                Ok(Expr {
                    kind: ExprKind::Lit(Literal::Num(-n)),
                    span: minus.span.to(t.span),
                })
            }
            Tok::Dur(ms) => {
                let t = self.bump();
                Ok(Expr {
                    kind: ExprKind::Lit(Literal::Dur(-ms)),
                    span: minus.span.to(t.span),
                })
            }
            _ => {
                let inner = self.unary()?;
                let span = minus.span.to(inner.span);
                Ok(Expr {
                    kind: ExprKind::Unary(UnaryOp::Neg, Box::new(inner)),
                    span,
                })
            }
        }
    }

    fn primary(&mut self) -> PResult<Expr> {
        let t = self.peek().clone();
        let lit = |l: Literal| Expr {
            kind: ExprKind::Lit(l),
            span: t.span,
        };
        match t.tok {
            Tok::Num(n) => {
                self.bump();
                Ok(lit(Literal::Num(n)))
            }
            Tok::Dur(ms) => {
                self.bump();
                Ok(lit(Literal::Dur(ms)))
            }
            Tok::Str(ref s) => {
                self.bump();
                Ok(lit(Literal::Str(s.clone())))
            }
            Tok::Kw(Kw::True) => {
                self.bump();
                Ok(lit(Literal::Bool(true)))
            }
            Tok::Kw(Kw::False) => {
                self.bump();
                Ok(lit(Literal::Bool(false)))
            }
            Tok::Kw(Kw::Null) => {
                self.bump();
                Ok(lit(Literal::Null))
            }
            Tok::LParen => {
                self.bump();
                let inner = self.expr()?;
                let close = self.expect(Tok::RParen, "`)`")?;
                Ok(Expr {
                    kind: inner.kind,
                    span: t.span.to(close.span),
                })
            }
            Tok::LBracket => self.list(),
            Tok::Kw(Kw::Profile) => {
                self.bump();
                let attr = self.profile_attr()?;
                let span = t.span.to(attr.span);
                Ok(Expr {
                    kind: ExprKind::Profile(attr),
                    span,
                })
            }
            Tok::Kw(Kw::Has) => {
                self.bump();
                self.expect(Tok::LParen, "`(` after `has`")?;
                if !self.at_kw(Kw::Profile) {
                    return Err(self.unexpected("`profile.NAME` inside `has(...)`"));
                }
                self.bump();
                let attr = self.profile_attr()?;
                let close = self.expect(Tok::RParen, "`)`")?;
                Ok(Expr {
                    kind: ExprKind::Has(attr),
                    span: t.span.to(close.span),
                })
            }
            Tok::Ident(ref name) if self.peek_at(1) == &Tok::LParen => {
                let name = name.clone();
                match AggFunc::from_name(&name) {
                    Some(func) => self.aggregate(func),
                    None => {
                        let mut d =
                            Diagnostic::new(Code::E0209, t.span, format!("unknown function `{name}`"));
                        d = match did_you_mean(&name, AGGREGATE_NAMES) {
                            Some(s) => d.with_hint(format!("did you mean `{s}`?")),
                            None => d.with_hint(format!(
                                "the functions are {}, and has",
                                AGGREGATE_NAMES.join(", ")
                            )),
                        };
                        Err(d)
                    }
                }
            }
            Tok::Ident(_) => {
                let mut parts = vec![self.ident()?];
                while self.at(&Tok::Dot) {
                    self.bump();
                    parts.push(self.ident_or_kw("a property name after `.`")?);
                }
                let span = parts[0].span.to(parts[parts.len() - 1].span);
                Ok(Expr {
                    kind: ExprKind::Name(parts),
                    span,
                })
            }
            _ => Err(self.unexpected("an expression")),
        }
    }

    fn ident(&mut self) -> PResult<Ident> {
        match self.peek().tok.clone() {
            Tok::Ident(name) => {
                let t = self.bump();
                Ok(Ident { name, span: t.span })
            }
            _ => Err(self.unexpected("a name")),
        }
    }

    /// Property and attribute names after a dot may be words that are reserved elsewhere.
    fn ident_or_kw(&mut self, what: &str) -> PResult<Ident> {
        match self.peek().tok.clone() {
            Tok::Ident(name) => {
                let t = self.bump();
                Ok(Ident { name, span: t.span })
            }
            Tok::Kw(k) => {
                let t = self.bump();
                Ok(Ident {
                    name: k.as_str().to_owned(),
                    span: t.span,
                })
            }
            _ => Err(self.unexpected(what)),
        }
    }

    /// `.NAME(.NAME)*` after `profile`, joined with dots into one attribute name.
    fn profile_attr(&mut self) -> PResult<Ident> {
        self.expect(Tok::Dot, "`.` after `profile`")?;
        let mut attr = self.ident_or_kw("an attribute name after `profile.`")?;
        while self.at(&Tok::Dot) {
            self.bump();
            let next = self.ident_or_kw("an attribute name after `.`")?;
            attr.name.push('.');
            attr.name.push_str(&next.name);
            attr.span = attr.span.to(next.span);
        }
        Ok(attr)
    }

    fn list(&mut self) -> PResult<Expr> {
        let open = self.bump();
        let mut items = Vec::new();
        while !self.at(&Tok::RBracket) {
            items.push(self.expr()?);
            if !self.at(&Tok::Comma) {
                break;
            }
            self.bump();
        }
        let close = self.expect(Tok::RBracket, "`,` or `]`")?;
        Ok(Expr {
            kind: ExprKind::List(items),
            span: open.span.to(close.span),
        })
    }

    fn aggregate(&mut self, func: AggFunc) -> PResult<Expr> {
        let name = self.bump();
        self.bump(); // `(`
        let event_type = match self.peek().tok.clone() {
            Tok::Ident(n) => {
                let t = self.bump();
                Ident {
                    name: n,
                    span: t.span,
                }
            }
            Tok::Str(s) => {
                let t = self.peek().clone();
                let example = if func.takes_property() {
                    format!("{}(payment.amount, 30d)", func.name())
                } else {
                    format!("{}(payment, 30d)", func.name())
                };
                return Err(Diagnostic::new(
                    Code::E0210,
                    t.span,
                    format!(
                        "`{}` takes an event type, not the string literal {}",
                        func.name(),
                        crate::ast::quote(&s)
                    ),
                )
                .with_hint(format!("write it without quotes, like `{example}`")));
            }
            _ => return Err(self.unexpected(&format!("an event type in `{}(...)`", func.name()))),
        };
        let mut property = Vec::new();
        while self.at(&Tok::Dot) {
            self.bump();
            property.push(self.ident_or_kw("a property name after `.`")?);
        }
        let filter = if self.at_kw(Kw::Where) {
            self.bump();
            Some(self.expr()?)
        } else {
            None
        };
        let window = if self.at(&Tok::Comma) {
            self.bump();
            let t = self.peek().clone();
            match t.tok {
                Tok::Dur(ms) => {
                    self.bump();
                    Some((Window::Span(ms), t.span))
                }
                Tok::Kw(Kw::Lifetime) => {
                    self.bump();
                    Some((Window::Lifetime, t.span))
                }
                _ => return Err(self.unexpected("a window (a duration like `30d`, or `lifetime`)")),
            }
        } else {
            None
        };
        if !self.at(&Tok::RParen) {
            let mut d = self.unexpected("`)`");
            if matches!(self.peek().tok, Tok::Dur(_) | Tok::Kw(Kw::Lifetime)) {
                d = d.with_hint("separate the window with a comma, like `, 30d`");
            }
            return Err(d);
        }
        let close = self.bump();
        Ok(Expr {
            kind: ExprKind::Agg(Box::new(Aggregate {
                func,
                func_span: name.span,
                event_type,
                property,
                filter,
                window,
            })),
            span: name.span.to(close.span),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expr(src: &str) -> String {
        parse_expr(src).unwrap_or_else(|d| panic!("{d:?}")).to_string()
    }

    #[test]
    fn precedence_matches_the_contract() {
        assert_eq!(
            expr("a or b and not c == 1 + 2 * 3"),
            "a or b and not c == 1 + 2 * 3"
        );
        let e = parse_expr("not a == b").unwrap();
        assert!(
            matches!(e.kind, ExprKind::Unary(UnaryOp::Not, ref inner) if matches!(inner.kind, ExprKind::Binary(BinaryOp::Eq, _, _)))
        );
        assert_eq!(expr("(a or b) and c"), "(a or b) and c");
        assert_eq!(expr("1 - (2 - 3)"), "1 - (2 - 3)");
        assert_eq!(expr("(1 - 2) - 3"), "1 - 2 - 3");
    }

    #[test]
    fn aggregates_parse_with_paths_filters_and_windows() {
        assert_eq!(
            expr("sum(payment.item.price where device.os == \"iOS\", 30d)"),
            "sum(payment.item.price where device.os == \"iOS\", 30d)"
        );
        assert_eq!(expr("count(payment, lifetime)"), "count(payment, lifetime)");
        assert_eq!(expr("since(lead_created) > 45m"), "since(lead_created) > 45m");
    }

    #[test]
    fn every_definition_error_is_reported() {
        let (file, diags) = parse("tag a = (1 +\ntrait b = 2\ntag c = 1 2\nsegment d = x");
        assert_eq!(diags.len(), 2, "{diags:?}");
        assert_eq!(file.defs.len(), 3);
    }
}
