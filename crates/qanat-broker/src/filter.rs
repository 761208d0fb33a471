//! Record-header predicates for push subscriptions (A6 server-side filtering).
//!
//! Grammar (keywords case-insensitive):
//! ```text
//! expr    := and ( OR and )*
//! and     := unary ( AND unary )*
//! unary   := NOT unary | '(' expr ')' | test
//! test    := name ( '=' | '!=' | '<>' ) string
//!          | name [ NOT ] IN '(' string ( ',' string )* ')'
//!          | name IS [ NOT ] NULL            -- header absent / present
//! name    := [A-Za-z_][A-Za-z0-9_.-]* | "double-quoted"
//! string  := 'single-quoted' ('' escapes a quote)
//! ```
//! Example: `app = 'shop' AND event IN ('pv','click')`. A record without the header never
//! equals anything and is never IN a list.

use std::fmt;

/// A parse error with the 1-based character position where it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter syntax error at position {position}: {message}")]
pub struct FilterError {
    pub position: usize,
    pub message: String,
}

/// A compiled filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    Or(Vec<Filter>),
    And(Vec<Filter>),
    Not(Box<Filter>),
    Eq(String, String),
    In(String, Vec<String>),
    Present(String),
}

impl Filter {
    /// Parse `text`; the empty string is not a filter.
    pub fn parse(text: &str) -> Result<Filter, FilterError> {
        let tokens = tokenize(text)?;
        let mut p = Parser {
            tokens,
            i: 0,
            end: text.chars().count() + 1,
        };
        let f = p.expr()?;
        match p.peek() {
            None => Ok(f),
            Some(t) => Err(p.error_at(t.pos, format!("unexpected {}", t.kind))),
        }
    }

    /// Evaluate against a record's headers (name, value); a header may repeat.
    pub fn matches(&self, headers: &[(&str, Option<&[u8]>)]) -> bool {
        fn values<'a>(
            headers: &'a [(&'a str, Option<&'a [u8]>)],
            name: &'a str,
        ) -> impl Iterator<Item = &'a [u8]> + 'a {
            headers
                .iter()
                .filter(move |(n, _)| *n == name)
                .filter_map(|(_, v)| *v)
        }
        match self {
            Filter::Or(fs) => fs.iter().any(|f| f.matches(headers)),
            Filter::And(fs) => fs.iter().all(|f| f.matches(headers)),
            Filter::Not(f) => !f.matches(headers),
            Filter::Eq(name, want) => values(headers, name).any(|v| v == want.as_bytes()),
            Filter::In(name, list) => {
                values(headers, name).any(|v| list.iter().any(|w| v == w.as_bytes()))
            }
            Filter::Present(name) => headers.iter().any(|(n, _)| *n == name),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Name(String),
    Str(String),
    Eq,
    Ne,
    LParen,
    RParen,
    Comma,
    And,
    Or,
    Not,
    In,
    Is,
    Null,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Name(n) => write!(f, "name {n:?}"),
            Kind::Str(s) => write!(f, "string '{s}'"),
            Kind::Eq => f.write_str("'='"),
            Kind::Ne => f.write_str("'!='"),
            Kind::LParen => f.write_str("'('"),
            Kind::RParen => f.write_str("')'"),
            Kind::Comma => f.write_str("','"),
            Kind::And => f.write_str("AND"),
            Kind::Or => f.write_str("OR"),
            Kind::Not => f.write_str("NOT"),
            Kind::In => f.write_str("IN"),
            Kind::Is => f.write_str("IS"),
            Kind::Null => f.write_str("NULL"),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    /// 1-based character position.
    pos: usize,
}

fn tokenize(text: &str) -> Result<Vec<Token>, FilterError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let err = |pos: usize, message: String| FilterError {
        position: pos + 1,
        message,
    };
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        let kind = match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '(' => {
                i += 1;
                Kind::LParen
            }
            ')' => {
                i += 1;
                Kind::RParen
            }
            ',' => {
                i += 1;
                Kind::Comma
            }
            '=' => {
                i += 1;
                Kind::Eq
            }
            '!' | '<' => {
                let next = chars.get(i + 1).copied();
                match (c, next) {
                    ('!', Some('=')) | ('<', Some('>')) => {
                        i += 2;
                        Kind::Ne
                    }
                    _ => return Err(err(i, format!("unexpected character {c:?}"))),
                }
            }
            '\'' | '"' => {
                let quote = c;
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(err(start, "unterminated quoted text".into())),
                        Some(&q) if q == quote => {
                            if chars.get(i + 1) == Some(&quote) {
                                s.push(quote);
                                i += 2;
                            } else {
                                i += 1;
                                break;
                            }
                        }
                        Some(&ch) => {
                            s.push(ch);
                            i += 1;
                        }
                    }
                }
                if quote == '\'' {
                    Kind::Str(s)
                } else {
                    Kind::Name(s)
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | '.' | '-'))
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                match word.to_ascii_uppercase().as_str() {
                    "AND" => Kind::And,
                    "OR" => Kind::Or,
                    "NOT" => Kind::Not,
                    "IN" => Kind::In,
                    "IS" => Kind::Is,
                    "NULL" => Kind::Null,
                    _ => Kind::Name(word),
                }
            }
            other => return Err(err(i, format!("unexpected character {other:?}"))),
        };
        out.push(Token {
            kind,
            pos: start + 1,
        });
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    i: usize,
    /// Position reported for "unexpected end".
    end: usize,
}

/// Deepest nesting accepted, so a hostile filter cannot exhaust the stack.
const MAX_DEPTH: usize = 64;

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.i)
    }

    fn error_at(&self, position: usize, message: String) -> FilterError {
        FilterError { position, message }
    }

    fn next(&mut self, what: &str) -> Result<Token, FilterError> {
        match self.tokens.get(self.i).cloned() {
            Some(t) => {
                self.i += 1;
                Ok(t)
            }
            None => Err(self.error_at(self.end, format!("expected {what}, found end of filter"))),
        }
    }

    fn eat(&mut self, kind: &Kind) -> bool {
        if self.peek().map(|t| &t.kind) == Some(kind) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expr(&mut self) -> Result<Filter, FilterError> {
        self.expr_at(0)
    }

    fn expr_at(&mut self, depth: usize) -> Result<Filter, FilterError> {
        let mut parts = vec![self.and(depth)?];
        while self.eat(&Kind::Or) {
            parts.push(self.and(depth)?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Filter::Or(parts)
        })
    }

    fn and(&mut self, depth: usize) -> Result<Filter, FilterError> {
        let mut parts = vec![self.unary(depth)?];
        while self.eat(&Kind::And) {
            parts.push(self.unary(depth)?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Filter::And(parts)
        })
    }

    fn unary(&mut self, depth: usize) -> Result<Filter, FilterError> {
        if depth > MAX_DEPTH {
            let pos = self.peek().map_or(self.end, |t| t.pos);
            return Err(self.error_at(pos, "filter nested too deeply".into()));
        }
        let t = self.next("a header name, NOT or '('")?;
        match t.kind {
            Kind::Not => Ok(Filter::Not(Box::new(self.unary(depth + 1)?))),
            Kind::LParen => {
                let inner = self.expr_at(depth + 1)?;
                let close = self.next("')'")?;
                if close.kind != Kind::RParen {
                    return Err(
                        self.error_at(close.pos, format!("expected ')', found {}", close.kind))
                    );
                }
                Ok(inner)
            }
            Kind::Name(name) => self.test(name),
            other => Err(self.error_at(t.pos, format!("expected a header name, found {other}"))),
        }
    }

    fn string(&mut self) -> Result<String, FilterError> {
        let t = self.next("a 'quoted' value")?;
        match t.kind {
            Kind::Str(s) => Ok(s),
            other => Err(self.error_at(t.pos, format!("expected a 'quoted' value, found {other}"))),
        }
    }

    fn list(&mut self) -> Result<Vec<String>, FilterError> {
        let open = self.next("'('")?;
        if open.kind != Kind::LParen {
            return Err(self.error_at(
                open.pos,
                format!("expected '(' after IN, found {}", open.kind),
            ));
        }
        let mut values = vec![self.string()?];
        loop {
            let t = self.next("',' or ')'")?;
            match t.kind {
                Kind::Comma => values.push(self.string()?),
                Kind::RParen => return Ok(values),
                other => {
                    return Err(self.error_at(t.pos, format!("expected ',' or ')', found {other}")))
                }
            }
        }
    }

    fn test(&mut self, name: String) -> Result<Filter, FilterError> {
        let t = self.next("'=', '!=', IN or IS")?;
        match t.kind {
            Kind::Eq => Ok(Filter::Eq(name, self.string()?)),
            Kind::Ne => Ok(Filter::Not(Box::new(Filter::Eq(name, self.string()?)))),
            Kind::In => Ok(Filter::In(name, self.list()?)),
            Kind::Not => {
                let t = self.next("IN")?;
                if t.kind != Kind::In {
                    return Err(
                        self.error_at(t.pos, format!("expected IN after NOT, found {}", t.kind))
                    );
                }
                Ok(Filter::Not(Box::new(Filter::In(name, self.list()?))))
            }
            Kind::Is => {
                let negate = self.eat(&Kind::Not);
                let t = self.next("NULL")?;
                if t.kind != Kind::Null {
                    return Err(self.error_at(t.pos, format!("expected NULL, found {}", t.kind)));
                }
                let present = Filter::Present(name);
                Ok(if negate {
                    present
                } else {
                    Filter::Not(Box::new(present))
                })
            }
            other => Err(self.error_at(
                t.pos,
                format!("expected '=', '!=', IN or IS, found {other}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn h<'a>(pairs: &'a [(&'a str, &'a str)]) -> Vec<(&'a str, Option<&'a [u8]>)> {
        pairs
            .iter()
            .map(|(k, v)| (*k, Some(v.as_bytes())))
            .collect()
    }

    #[test]
    fn the_documented_example() {
        let f = Filter::parse("app = 'shop' AND event IN ('pv','click')").unwrap();
        assert!(f.matches(&h(&[("app", "shop"), ("event", "pv")])));
        assert!(f.matches(&h(&[("event", "click"), ("app", "shop")])));
        assert!(!f.matches(&h(&[("app", "shop"), ("event", "buy")])));
        assert!(!f.matches(&h(&[("app", "mall"), ("event", "pv")])));
        assert!(!f.matches(&h(&[("event", "pv")])));
    }

    #[test]
    fn precedence_not_and_null_tests() {
        let f = Filter::parse("a = '1' OR b = '2' AND NOT c = '3'").unwrap();
        assert!(f.matches(&h(&[("a", "1")])));
        assert!(f.matches(&h(&[("b", "2")])));
        assert!(!f.matches(&h(&[("b", "2"), ("c", "3")])));
        let f = Filter::parse("(a = '1' OR b = '2') and x is not null and y IS NULL").unwrap();
        assert!(f.matches(&h(&[("a", "1"), ("x", "")])));
        assert!(!f.matches(&h(&[("a", "1"), ("x", ""), ("y", "")])));
        let f = Filter::parse("\"odd name\" != 'it''s' AND k NOT IN ('x')").unwrap();
        assert!(f.matches(&h(&[("odd name", "its"), ("k", "y")])));
        assert!(!f.matches(&h(&[("odd name", "it's")])));
    }

    #[test]
    fn errors_point_at_the_problem() {
        let e = Filter::parse("app = shop").unwrap_err();
        assert_eq!(e.position, 7);
        let e = Filter::parse("app = 'shop' AND").unwrap_err();
        assert_eq!(e.position, 17);
        let e = Filter::parse("app == 'x'").unwrap_err();
        assert_eq!(e.position, 6);
        let e = Filter::parse("app = 'x").unwrap_err();
        assert_eq!(e.position, 7);
        let e = Filter::parse("a IN ('x' 'y')").unwrap_err();
        assert_eq!(e.position, 11);
        assert!(Filter::parse("").is_err());
        assert!(Filter::parse(&"(".repeat(500)).is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(text in ".{0,80}") {
            let _ = Filter::parse(&text);
        }
    }
}
