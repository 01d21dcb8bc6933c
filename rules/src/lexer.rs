//! Tokens of the rule language. The lexer never stops at the first error: bad characters
//! become diagnostics and lexing goes on, so a rule file reports every problem at once.

use rust_decimal::Decimal;
use std::str::FromStr;

use crate::diagnostic::{Code, Diagnostic, Span};

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    Ident(String),
    Num(Decimal),
    /// A duration literal in milliseconds.
    Dur(i64),
    Str(String),
    Kw(Kw),
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Dot,
    Assign,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Plus,
    Minus,
    Star,
    Slash,
    Eof,
}

/// Reserved words. Aggregate function names are reserved too (see [`is_reserved`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kw {
    Trait,
    Tag,
    Segment,
    On,
    Where,
    Ttl,
    And,
    Or,
    Not,
    In,
    Contains,
    StartsWith,
    True,
    False,
    Null,
    Lifetime,
    Profile,
    Has,
}

impl Kw {
    pub fn from_word(w: &str) -> Option<Kw> {
        Some(match w {
            "trait" => Kw::Trait,
            "tag" => Kw::Tag,
            "segment" => Kw::Segment,
            "on" => Kw::On,
            "where" => Kw::Where,
            "ttl" => Kw::Ttl,
            "and" => Kw::And,
            "or" => Kw::Or,
            "not" => Kw::Not,
            "in" => Kw::In,
            "contains" => Kw::Contains,
            "starts_with" => Kw::StartsWith,
            "true" => Kw::True,
            "false" => Kw::False,
            "null" => Kw::Null,
            "lifetime" => Kw::Lifetime,
            "profile" => Kw::Profile,
            "has" => Kw::Has,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kw::Trait => "trait",
            Kw::Tag => "tag",
            Kw::Segment => "segment",
            Kw::On => "on",
            Kw::Where => "where",
            Kw::Ttl => "ttl",
            Kw::And => "and",
            Kw::Or => "or",
            Kw::Not => "not",
            Kw::In => "in",
            Kw::Contains => "contains",
            Kw::StartsWith => "starts_with",
            Kw::True => "true",
            Kw::False => "false",
            Kw::Null => "null",
            Kw::Lifetime => "lifetime",
            Kw::Profile => "profile",
            Kw::Has => "has",
        }
    }
}

/// Names of aggregate functions; they cannot name a definition.
pub const AGGREGATE_NAMES: [&str; 9] = [
    "count", "sum", "avg", "min", "max", "distinct", "last", "first", "since",
];

pub fn is_reserved(word: &str) -> bool {
    Kw::from_word(word).is_some() || AGGREGATE_NAMES.contains(&word)
}

impl Tok {
    /// How the token is described in "expected ..., found ..." messages.
    pub fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("name `{s}`"),
            Tok::Num(n) => format!("number `{n}`"),
            Tok::Dur(ms) => format!("duration `{}`", crate::ast::format_duration(*ms)),
            Tok::Str(s) => format!("string {}", crate::ast::quote(s)),
            Tok::Kw(k) => format!("`{}`", k.as_str()),
            Tok::Eof => "end of file".to_owned(),
            other => format!("`{}`", other.symbol()),
        }
    }

    pub fn symbol(&self) -> &'static str {
        match self {
            Tok::LParen => "(",
            Tok::RParen => ")",
            Tok::LBracket => "[",
            Tok::RBracket => "]",
            Tok::Comma => ",",
            Tok::Dot => ".",
            Tok::Assign => "=",
            Tok::Eq => "==",
            Tok::Ne => "!=",
            Tok::Lt => "<",
            Tok::Le => "<=",
            Tok::Gt => ">",
            Tok::Ge => ">=",
            Tok::Plus => "+",
            Tok::Minus => "-",
            Tok::Star => "*",
            Tok::Slash => "/",
            _ => "",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub tok: Tok,
    pub span: Span,
}

pub fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_'
}

pub fn is_ident_continue(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Milliseconds per duration unit.
pub fn duration_unit(unit: &str) -> Option<i64> {
    Some(match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    })
}

/// Splits `source` into tokens; the last token is always `Eof`.
pub fn lex(source: &str) -> (Vec<Token>, Vec<Diagnostic>) {
    let mut lexer = Lexer {
        src: source,
        pos: 0,
        tokens: Vec::new(),
        diags: Vec::new(),
    };
    lexer.run();
    (lexer.tokens, lexer.diags)
}

struct Lexer<'a> {
    src: &'a str,
    pos: usize,
    tokens: Vec<Token>,
    diags: Vec<Diagnostic>,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn peek2(&self) -> Option<char> {
        let mut it = self.src[self.pos..].chars();
        it.next();
        it.next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn push(&mut self, tok: Tok, start: usize) {
        self.tokens.push(Token {
            tok,
            span: Span::new(start, self.pos),
        });
    }

    fn run(&mut self) {
        while let Some(c) = self.peek() {
            let start = self.pos;
            if c.is_whitespace() || crate::normalize::is_format_char(c) {
                self.bump();
                continue;
            }
            if c == '#' {
                while let Some(c) = self.peek() {
                    if c == '\n' {
                        break;
                    }
                    self.bump();
                }
                continue;
            }
            if c.is_ascii_digit() {
                self.number(start);
                continue;
            }
            if is_ident_start(c) {
                while self.peek().is_some_and(is_ident_continue) {
                    self.bump();
                }
                let word = &self.src[start..self.pos];
                let tok = match Kw::from_word(word) {
                    Some(kw) => Tok::Kw(kw),
                    None => Tok::Ident(word.to_owned()),
                };
                self.push(tok, start);
                continue;
            }
            if c == '"' {
                self.string(start, '"');
                continue;
            }
            if c == '\'' {
                self.diags.push(
                    Diagnostic::new(
                        Code::E0001,
                        Span::new(start, start + 1),
                        "strings use double quotes",
                    )
                    .with_hint("write \"...\" instead of '...'"),
                );
                self.string(start, '\'');
                continue;
            }
            self.bump();
            let two = |l: &mut Self, next: char, yes: Tok, no: Tok| {
                if l.peek() == Some(next) {
                    l.bump();
                    yes
                } else {
                    no
                }
            };
            let tok = match c {
                '(' => Tok::LParen,
                ')' => Tok::RParen,
                '[' => Tok::LBracket,
                ']' => Tok::RBracket,
                ',' => Tok::Comma,
                '.' => Tok::Dot,
                '+' => Tok::Plus,
                '-' => Tok::Minus,
                '*' => Tok::Star,
                '/' => Tok::Slash,
                '=' => two(self, '=', Tok::Eq, Tok::Assign),
                '<' => two(self, '=', Tok::Le, Tok::Lt),
                '>' => two(self, '=', Tok::Ge, Tok::Gt),
                '!' if self.peek() == Some('=') => {
                    self.bump();
                    Tok::Ne
                }
                // Common slips get one clear error and lex as what was meant, so parsing
                // goes on without a cascade of follow-on errors.
                '&' | '|' | '!' | '（' | '）' | '，' | '＝' | '＜' | '＞' => {
                    let (tok, hint) = match c {
                        '&' => {
                            if self.peek() == Some('&') {
                                self.bump();
                            }
                            (Tok::Kw(Kw::And), "write `and`")
                        }
                        '|' => {
                            if self.peek() == Some('|') {
                                self.bump();
                            }
                            (Tok::Kw(Kw::Or), "write `or`")
                        }
                        '!' => (
                            Tok::Kw(Kw::Not),
                            "write `not x` for negation and `!=` for inequality",
                        ),
                        '（' => (Tok::LParen, "this is a full-width `（`; write the ASCII `(`"),
                        '）' => (Tok::RParen, "this is a full-width `）`; write the ASCII `)`"),
                        '，' => (Tok::Comma, "this is a full-width `，`; write the ASCII `,`"),
                        '＝' => (Tok::Eq, "this is a full-width `＝`; compare with the ASCII `==`"),
                        '＜' => (Tok::Lt, "this is a full-width `＜`; write the ASCII `<`"),
                        _ => (Tok::Gt, "this is a full-width `＞`; write the ASCII `>`"),
                    };
                    let text = &self.src[start..self.pos];
                    self.diags.push(
                        Diagnostic::new(
                            Code::E0001,
                            Span::new(start, self.pos),
                            format!("unexpected `{text}`"),
                        )
                        .with_hint(hint),
                    );
                    tok
                }
                _ => {
                    let mut d = Diagnostic::new(
                        Code::E0001,
                        Span::new(start, self.pos),
                        format!("unexpected character `{c}`"),
                    );
                    if matches!(c, '“' | '”' | '‘' | '’') {
                        d = d.with_hint("strings use straight double quotes: \"...\"");
                    }
                    self.diags.push(d);
                    continue;
                }
            };
            self.push(tok, start);
        }
        let end = self.src.len();
        self.tokens.push(Token {
            tok: Tok::Eof,
            span: Span::new(end, end),
        });
    }

    fn number(&mut self, start: usize) {
        while self.peek().is_some_and(|c| c.is_ascii_digit() || c == '_') {
            self.bump();
        }
        if self.peek() == Some('.') && self.peek2().is_some_and(|c| c.is_ascii_digit()) {
            self.bump();
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.bump();
            }
        }
        let digits_end = self.pos;
        let digits: String = self.src[start..digits_end]
            .chars()
            .filter(|c| *c != '_')
            .collect();
        let unit_start = self.pos;
        while self.peek().is_some_and(is_ident_continue) {
            self.bump();
        }
        let unit = &self.src[unit_start..self.pos];
        let span = Span::new(start, self.pos);
        let Ok(value) = Decimal::from_str(&digits) else {
            self.diags.push(Diagnostic::new(
                Code::E0003,
                span,
                format!("number `{digits}` is out of range"),
            ));
            self.push(Tok::Num(Decimal::ZERO), start);
            return;
        };
        if unit.is_empty() {
            self.push(Tok::Num(value), start);
            return;
        }
        let Some(ms_per_unit) = duration_unit(unit) else {
            self.diags.push(
                Diagnostic::new(Code::E0003, span, format!("unknown duration unit `{unit}`"))
                    .with_hint("durations are written like 500ms, 30s, 45m, 12h or 30d"),
            );
            // Recover with a valid duration so no follow-on error is reported for it.
            self.push(Tok::Dur(1), start);
            return;
        };
        let ms = value.checked_mul(Decimal::from(ms_per_unit));
        match ms.map(|ms| (ms.fract().is_zero(), i64::try_from(ms))) {
            Some((true, Ok(ms))) => self.push(Tok::Dur(ms), start),
            None | Some((true, Err(_))) => {
                self.diags.push(Diagnostic::new(
                    Code::E0003,
                    span,
                    format!("duration `{digits}{unit}` is out of range"),
                ));
                self.push(Tok::Dur(1), start);
            }
            Some((false, _)) => {
                self.diags.push(
                    Diagnostic::new(
                        Code::E0003,
                        span,
                        format!("duration `{digits}{unit}` is not a whole number of milliseconds"),
                    )
                    .with_hint("time is counted in whole milliseconds"),
                );
                self.push(Tok::Dur(1), start);
            }
        }
    }

    fn string(&mut self, start: usize, quote: char) {
        self.bump();
        let mut text = String::new();
        loop {
            let Some(c) = self.bump() else {
                self.diags.push(
                    Diagnostic::new(Code::E0002, Span::new(start, self.pos), "unterminated string")
                        .with_hint("close the string with `\"`"),
                );
                break;
            };
            match c {
                c if c == quote => break,
                '\n' => {
                    self.pos -= 1;
                    self.diags.push(
                        Diagnostic::new(Code::E0002, Span::new(start, self.pos), "unterminated string")
                            .with_hint("strings end on the line they start; close it with `\"`"),
                    );
                    break;
                }
                '\\' => {
                    let esc_start = self.pos - 1;
                    match self.bump() {
                        Some('"') => text.push('"'),
                        Some('\\') => text.push('\\'),
                        Some('n') => text.push('\n'),
                        Some('t') => text.push('\t'),
                        Some('u') => self.unicode_escape(esc_start, &mut text),
                        other => {
                            let shown = other.map_or(String::new(), String::from);
                            self.diags.push(
                                Diagnostic::new(
                                    Code::E0004,
                                    Span::new(esc_start, self.pos),
                                    format!("invalid escape `\\{shown}`"),
                                )
                                .with_hint("valid escapes are \\\" \\\\ \\n \\t \\u{XXXX}"),
                            );
                        }
                    }
                }
                c => text.push(c),
            }
        }
        self.push(Tok::Str(text), start);
    }

    fn unicode_escape(&mut self, esc_start: usize, text: &mut String) {
        let rest = &self.src[self.pos..];
        let parsed = rest
            .strip_prefix('{')
            .and_then(|r| r.find('}').map(|end| (&r[..end], end + 2)))
            .and_then(|(hex, len)| {
                u32::from_str_radix(hex, 16)
                    .ok()
                    .and_then(char::from_u32)
                    .map(|c| (c, len))
            });
        match parsed {
            Some((c, len)) => {
                text.push(c);
                self.pos += len;
            }
            None => self.diags.push(
                Diagnostic::new(
                    Code::E0004,
                    Span::new(esc_start, self.pos),
                    "invalid escape `\\u`",
                )
                .with_hint("write a code point as \\u{200B}"),
            ),
        }
    }
}

/// Parses one duration literal as rules write it (`"45m"`, `"7d"`, `"500ms"`), surrounding
/// white space ignored; `None` for anything else, or a duration that is not positive.
pub fn parse_duration(text: &str) -> Option<i64> {
    match lex(text.trim()) {
        (tokens, diags) if diags.is_empty() && tokens.len() == 2 => match tokens[0].tok {
            Tok::Dur(ms) if ms > 0 => Some(ms),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_positive_duration_literal_parses_and_nothing_else_does() {
        assert_eq!(parse_duration(" 7d "), Some(7 * 86_400_000));
        assert_eq!(parse_duration("45m"), Some(45 * 60_000));
        for bad in ["", "7", "0s", "7d 1h", "forever", "-5m"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    fn toks(src: &str) -> Vec<Tok> {
        let (tokens, diags) = lex(src);
        assert!(diags.is_empty(), "{diags:?}");
        tokens.into_iter().map(|t| t.tok).collect()
    }

    #[test]
    fn durations_are_milliseconds() {
        assert_eq!(
            toks("500ms 30s 45m 12h 30d 1.5h"),
            vec![
                Tok::Dur(500),
                Tok::Dur(30_000),
                Tok::Dur(2_700_000),
                Tok::Dur(43_200_000),
                Tok::Dur(2_592_000_000),
                Tok::Dur(5_400_000),
                Tok::Eof
            ]
        );
    }

    #[test]
    fn names_in_any_script() {
        assert_eq!(
            toks("tag 高价值活跃客户 # comment\n"),
            vec![Tok::Kw(Kw::Tag), Tok::Ident("高价值活跃客户".into()), Tok::Eof]
        );
    }

    #[test]
    fn bad_unit_is_reported_and_lexing_goes_on() {
        let (tokens, diags) = lex("count(x, 7w) @ && y");
        assert_eq!(diags.len(), 3);
        assert_eq!(diags[2].code, Code::E0001);
        assert!(tokens.iter().any(|t| t.tok == Tok::Kw(Kw::And)));
        assert_eq!(diags[0].code, Code::E0003);
        assert_eq!(diags[1].code, Code::E0001);
        assert_eq!(tokens.last().unwrap().tok, Tok::Eof);
    }
}
