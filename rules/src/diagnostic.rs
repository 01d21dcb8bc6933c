//! Diagnostics people can act on: a stable code, a message, the exact span, and a hint.
//!
//! Rendering shows the source line with carets under the span, aligned for wide (CJK)
//! characters:
//!
//! ```text
//! error[E0201]: unknown name `engagment`
//!  --> rules.trl:3:12
//!   |
//! 3 | tag hot = engagment >= 10
//!   |           ^^^^^^^^^
//!   = hint: did you mean `engagement`?
//! ```

use std::fmt::Write as _;

use serde::Serialize;
use unicode_width::UnicodeWidthChar;

/// A byte range of the rule source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        Span { start, end }
    }

    pub fn to(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }
}

/// Stable error codes; documented in `docs/rules.md`. Never renumber one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Code {
    /// A character that cannot start any token.
    E0001,
    /// A string literal without its closing quote.
    E0002,
    /// A malformed number or duration (unknown unit, fraction of a millisecond).
    E0003,
    /// An invalid escape sequence in a string.
    E0004,
    /// A token where another was expected.
    E0101,
    /// A reserved word used as a definition name.
    E0102,
    /// Comparisons chained without parentheses (`a < b < c`).
    E0103,
    /// Two definitions with the same name.
    E0201,
    /// A name that is not defined.
    E0202,
    /// Definitions that depend on each other in a cycle.
    E0203,
    /// `ttl` on a condition tag.
    E0204,
    /// An aggregate without the window it needs.
    E0205,
    /// A window on an aggregate that takes none.
    E0206,
    /// An aggregate or definition name inside `where`.
    E0207,
    /// A dotted name outside `where` that is not `profile.x`.
    E0208,
    /// An unknown aggregate function.
    E0209,
    /// An aggregate whose argument has the wrong shape (`sum("x", 30d)`, `count(a.b, 7d)`).
    E0210,
    /// Operands whose types cannot be compared (a duration with a number).
    E0301,
    /// An operator applied to a value of the wrong type (`and` on a number).
    E0302,
    /// A tag or segment whose condition cannot be a bool.
    E0303,
    /// `since(...)` multiplied or divided by another time-dependent value.
    E0304,
    /// A window or ttl that is zero or negative.
    E0305,
    /// An event type the tracking plan does not list.
    E0401,
    /// An event property the tracking plan does not list for its type.
    E0402,
    /// A profile attribute the tracking plan does not list.
    E0403,
    /// A property or attribute compared with a value of another type than planned.
    E0404,
    /// A property or attribute compared with a value outside its planned enum.
    E0405,
    /// (warning) An event type never received.
    W0501,
    /// (warning) An event property never received with its type.
    W0502,
    /// (warning) A profile attribute never received.
    W0503,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::E0001 => "E0001",
            Code::E0002 => "E0002",
            Code::E0003 => "E0003",
            Code::E0004 => "E0004",
            Code::E0101 => "E0101",
            Code::E0102 => "E0102",
            Code::E0103 => "E0103",
            Code::E0201 => "E0201",
            Code::E0202 => "E0202",
            Code::E0203 => "E0203",
            Code::E0204 => "E0204",
            Code::E0205 => "E0205",
            Code::E0206 => "E0206",
            Code::E0207 => "E0207",
            Code::E0208 => "E0208",
            Code::E0209 => "E0209",
            Code::E0210 => "E0210",
            Code::E0301 => "E0301",
            Code::E0302 => "E0302",
            Code::E0303 => "E0303",
            Code::E0304 => "E0304",
            Code::E0305 => "E0305",
            Code::E0401 => "E0401",
            Code::E0402 => "E0402",
            Code::E0403 => "E0403",
            Code::E0404 => "E0404",
            Code::E0405 => "E0405",
            Code::W0501 => "W0501",
            Code::W0502 => "W0502",
            Code::W0503 => "W0503",
        }
    }

    /// Warnings (`W…`) do not stop a rule set from loading.
    pub fn is_warning(self) -> bool {
        self.as_str().starts_with('W')
    }
}

/// One problem in a rule set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub code: Code,
    pub message: String,
    pub span: Span,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn new(code: Code, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            code,
            message: message.into(),
            span,
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Diagnostic {
        self.hint = Some(hint.into());
        self
    }

    /// Where the span starts: 1-based line and column (in characters).
    pub fn position(&self, source: &str) -> Position {
        Position::of(source, self.span.start)
    }

    /// The diagnostic as structured data (for the API's 422 answer).
    pub fn located(&self, source: &str) -> LocatedDiagnostic {
        let pos = self.position(source);
        LocatedDiagnostic {
            code: self.code.as_str(),
            severity: if self.code.is_warning() {
                "warning"
            } else {
                "error"
            },
            message: self.message.clone(),
            line: pos.line,
            column: pos.column,
            end_line: Position::of(source, self.span.end).line,
            end_column: Position::of(source, self.span.end).column,
            hint: self.hint.clone(),
            rendered: self.render(source, "rules"),
        }
    }

    /// Renders the diagnostic like a compiler does, for a file called `origin`.
    pub fn render(&self, source: &str, origin: &str) -> String {
        let pos = self.position(source);
        let line_text = source.lines().nth(pos.line - 1).unwrap_or("");
        let gutter = pos.line.to_string().len();
        let pad = " ".repeat(gutter);
        let mut out = String::new();
        let severity = if self.code.is_warning() {
            "warning"
        } else {
            "error"
        };
        let _ = writeln!(out, "{severity}[{}]: {}", self.code.as_str(), self.message);
        let _ = writeln!(out, "{pad}--> {origin}:{}:{}", pos.line, pos.column);
        let _ = writeln!(out, "{pad} |");
        let _ = writeln!(out, "{} | {}", pos.line, line_text);
        let line_start = source[..self.span.start.min(source.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let before = &source[line_start..self.span.start.min(source.len())];
        let indent: usize = before.chars().map(display_width).sum();
        let span_end = self
            .span
            .end
            .min(line_start + line_text.len())
            .max(self.span.start);
        let marked = source.get(self.span.start..span_end).unwrap_or("");
        let width = marked.chars().map(display_width).sum::<usize>().max(1);
        let _ = writeln!(out, "{pad} | {}{}", " ".repeat(indent), "^".repeat(width));
        if let Some(hint) = &self.hint {
            let _ = writeln!(out, "{pad} = hint: {hint}");
        }
        out
    }
}

fn display_width(c: char) -> usize {
    if c == '\t' {
        1
    } else {
        c.width().unwrap_or(0)
    }
}

/// A diagnostic with its position resolved, as the API returns it.
#[derive(Debug, Clone, Serialize)]
pub struct LocatedDiagnostic {
    pub code: &'static str,
    /// `error` or `warning`.
    pub severity: &'static str,
    pub message: String,
    pub line: usize,
    pub column: usize,
    pub end_line: usize,
    pub end_column: usize,
    pub hint: Option<String>,
    pub rendered: String,
}

/// 1-based line and column (columns count characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl Position {
    pub fn of(source: &str, offset: usize) -> Position {
        let offset = offset.min(source.len());
        let before = &source[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Position { line, column }
    }
}

/// Every diagnostic of a rule set, rendered one after another.
pub fn render_all(diagnostics: &[Diagnostic], source: &str, origin: &str) -> String {
    let mut out = String::new();
    for d in diagnostics {
        out.push_str(&d.render(source, origin));
        out.push('\n');
    }
    let warnings = diagnostics.iter().filter(|d| d.code.is_warning()).count();
    let errors = diagnostics.len() - warnings;
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    let _ = if warnings == 0 {
        writeln!(out, "{errors} error{} in {origin}", plural(errors))
    } else {
        writeln!(
            out,
            "{errors} error{}, {warnings} warning{} in {origin}",
            plural(errors),
            plural(warnings)
        )
    };
    out
}

/// The closest candidate to `name` for a "did you mean" hint, if one is close enough.
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, c)| (*d, *c))
        .map(|(_, c)| c)
}

/// Edit distance over characters, a swap of two neighbours counting as one edit
/// (optimal string alignment), so `veiw` is one edit from `view`.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 0..a.len() {
        cur[0] = i + 1;
        for j in 0..b.len() {
            let subst = prev[j] + usize::from(a[i] != b[j]);
            let mut best = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
            if i > 0 && j > 0 && a[i] == b[j - 1] && a[i - 1] == b[j] {
                best = best.min(before[j - 1] + 1);
            }
            cur[j + 1] = best;
        }
        std::mem::swap(&mut before, &mut prev);
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_pick_the_closest_name() {
        let names = ["engagement", "churn_risk", "hot_lead"];
        assert_eq!(did_you_mean("engagment", names), Some("engagement"));
        assert_eq!(did_you_mean("zzz", names), None);
    }

    #[test]
    fn columns_count_characters() {
        let src = "tag 高价值 = x\n";
        assert_eq!(
            Position::of(src, src.find('x').unwrap()),
            Position { line: 1, column: 11 }
        );
    }
}
