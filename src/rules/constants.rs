//! Integer constants of a rules file and the arithmetic of op arguments.
//!
//! ```text
//! let heads = 32
//! let dim = 4096
//! let head_dim = dim / heads
//! layers\.(\d+)\.attention\.wq\.weight => model.layers.$1.self_attn.q_proj.weight | reshape(heads, 2, head_dim / 2, dim)
//! ```
//!
//! A `let` defines a name once, from integers, names defined before it and
//! `+ - * /` with parentheses; every op argument is such an expression. All
//! arithmetic is on `i64`, checked: a division that leaves a remainder (a
//! non-integer result), a division by zero, an overflow or an undefined name is
//! an error when the rule is parsed. [`Constants`] are the values set from
//! outside (`--set heads=8`): each replaces the value of the `let` of that name
//! (the names defined after it follow), and one naming no `let` is an error.
use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Values given to a rules file's constants from outside (`--set NAME=VALUE`),
/// each replacing the value its `let` gives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Constants {
    values: BTreeMap<String, i64>,
}

impl Constants {
    /// None set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` to `value`; a name that is not an identifier is an error.
    pub fn set(&mut self, name: &str, value: i64) -> Result<()> {
        if !is_identifier(name) {
            return Err(Error::Rule {
                at: format!("--set {name}"),
                message: format!(
                    "{name:?} is not a constant's name (letters, digits and _, not first a digit)"
                ),
            });
        }
        self.values.insert(name.to_string(), value);
        Ok(())
    }

    /// Sets a constant from `NAME=VALUE` (a `--set` flag's text).
    pub fn set_text(&mut self, text: &str) -> Result<()> {
        let bad = |message: String| Error::Rule { at: format!("--set {text}"), message };
        let (name, value) =
            text.split_once('=').ok_or_else(|| bad("expected NAME=VALUE, as `heads=8`".into()))?;
        let value =
            value.trim().parse::<i64>().map_err(|_| bad(format!("{:?} is not an integer", value.trim())))?;
        self.set(name.trim(), value)
    }

    /// The value set for `name`.
    pub fn get(&self, name: &str) -> Option<i64> {
        self.values.get(name).copied()
    }

    /// Whether none is set.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The names set, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }
}

/// Whether `text` is a name: `[A-Za-z_][A-Za-z0-9_]*`.
pub(super) fn is_identifier(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The constants in scope while a file is read: name and value, in order.
pub(super) type Scope = Vec<(String, i64)>;

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Number(i64),
    Name(String),
    Symbol(char),
}

/// Takes the letters, digits and underscores from `at` on; the byte offset
/// after them.
fn word_end(chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>, at: usize) -> usize {
    let mut end = at;
    while let Some(&(k, d)) = chars.peek() {
        if !d.is_ascii_alphanumeric() && d != '_' {
            break;
        }
        end = k + d.len_utf8();
        chars.next();
    }
    end
}

fn tokens(text: &str) -> std::result::Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some(&(at, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c.is_ascii_digit() {
            let end = word_end(&mut chars, at);
            let digits = &text[at..end];
            let n =
                digits.parse::<i64>().map_err(|_| format!("{digits:?} is not an integer an i64 holds"))?;
            out.push(Token::Number(n));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let end = word_end(&mut chars, at);
            out.push(Token::Name(text[at..end].to_string()));
        } else if "+-*/()".contains(c) {
            out.push(Token::Symbol(c));
            chars.next();
        } else {
            return Err(format!(
                "{c:?} has no meaning in an integer expression (integers, names, + - * / and parentheses)"
            ));
        }
    }
    Ok(out)
}

/// A recursive-descent reader of one expression's tokens.
struct Reader<'a> {
    tokens: &'a [Token],
    at: usize,
    scope: &'a Scope,
    text: &'a str,
    depth: usize,
}

/// The deepest nesting of parentheses and signs read.
const MAX_DEPTH: usize = 64;

impl Reader<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn sum(&mut self) -> std::result::Result<i64, String> {
        let mut value = self.product()?;
        while let Some(Token::Symbol(op @ ('+' | '-'))) = self.peek() {
            let op = *op;
            self.at += 1;
            let right = self.product()?;
            value = if op == '+' { value.checked_add(right) } else { value.checked_sub(right) }
                .ok_or_else(|| format!("{:?} overflows an i64", self.text))?;
        }
        Ok(value)
    }

    fn product(&mut self) -> std::result::Result<i64, String> {
        let mut value = self.unary()?;
        while let Some(Token::Symbol(op @ ('*' | '/'))) = self.peek() {
            let op = *op;
            self.at += 1;
            let right = self.unary()?;
            value = if op == '*' {
                value.checked_mul(right).ok_or_else(|| format!("{:?} overflows an i64", self.text))?
            } else if right == 0 {
                return Err(format!("{:?} divides by zero", self.text));
            } else if value.checked_rem(right) != Some(0) {
                return Err(format!(
                    "{value} / {right} in {:?} leaves a remainder: op arguments are integers",
                    self.text
                ));
            } else {
                value.checked_div(right).ok_or_else(|| format!("{:?} overflows an i64", self.text))?
            };
        }
        Ok(value)
    }

    fn unary(&mut self) -> std::result::Result<i64, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("{:?} nests deeper than {MAX_DEPTH}", self.text));
        }
        let value = match self.peek().cloned() {
            Some(Token::Symbol('-')) => {
                self.at += 1;
                self.unary()?.checked_neg().ok_or_else(|| format!("{:?} overflows an i64", self.text))?
            }
            Some(Token::Symbol('(')) => {
                self.at += 1;
                let value = self.sum()?;
                if self.peek() != Some(&Token::Symbol(')')) {
                    return Err(format!("{:?}: a `(` is not closed", self.text));
                }
                self.at += 1;
                value
            }
            Some(Token::Number(n)) => {
                self.at += 1;
                n
            }
            Some(Token::Name(name)) => {
                self.at += 1;
                match self.scope.iter().rev().find(|(n, _)| *n == name) {
                    Some((_, value)) => *value,
                    None => {
                        let known: Vec<&str> = self.scope.iter().map(|(n, _)| n.as_str()).collect();
                        let known = if known.is_empty() {
                            "none is defined: write `let NAME = VALUE` before the rule".to_string()
                        } else {
                            format!("defined: {}", known.join(", "))
                        };
                        return Err(format!("`{name}` is not a defined constant ({known})"));
                    }
                }
            }
            Some(Token::Symbol(c)) => return Err(format!("{:?}: unexpected `{c}`", self.text)),
            None => return Err(format!("{:?} is not a complete expression", self.text)),
        };
        self.depth -= 1;
        Ok(value)
    }
}

/// The value of `text`, an integer expression over the constants in `scope`.
pub(super) fn evaluate(text: &str, scope: &Scope) -> std::result::Result<i64, String> {
    let tokens = tokens(text)?;
    if tokens.is_empty() {
        return Err("an empty argument".into());
    }
    let mut reader = Reader { tokens: &tokens, at: 0, scope, text: text.trim(), depth: 0 };
    let value = reader.sum()?;
    if reader.at != tokens.len() {
        return Err(format!("{:?}: unexpected text after a complete expression", text.trim()));
    }
    Ok(value)
}

/// Reads `let NAME = EXPR` (the text after `let`): the name and its value,
/// the value `sets` gives it if any (the expression must still be valid).
pub(super) fn define(
    text: &str,
    scope: &Scope,
    sets: &Constants,
) -> std::result::Result<(String, i64), String> {
    let (name, expression) =
        text.split_once('=').ok_or_else(|| "expected `let NAME = VALUE`, as `let heads = 32`".to_string())?;
    let name = name.trim();
    if !is_identifier(name) {
        return Err(format!("{name:?} is not a constant's name (letters, digits and _, not first a digit)"));
    }
    if scope.iter().any(|(n, _)| n == name) {
        return Err(format!("`{name}` is defined twice"));
    }
    let value = evaluate(expression, scope).map_err(|e| format!("let {name}: {e}"))?;
    Ok((name.to_string(), sets.get(name).unwrap_or(value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> Scope {
        vec![("dim".into(), 4096), ("heads".into(), 32), ("n_kv".into(), 8)]
    }

    #[test]
    fn arithmetic_follows_precedence() {
        let s = scope();
        assert_eq!(evaluate("dim / heads / 2", &s), Ok(64));
        assert_eq!(evaluate("-1", &s), Ok(-1));
        assert_eq!(evaluate(" 2 + 3 * 4 ", &s), Ok(14));
        assert_eq!(evaluate("(2 + 3) * 4", &s), Ok(20));
        assert_eq!(evaluate("n_kv * (dim / heads)", &s), Ok(1024));
        assert_eq!(evaluate("10 - 2 - 3", &s), Ok(5));
        assert_eq!(evaluate("--3", &s), Ok(3));
    }

    #[test]
    fn what_is_not_an_integer_is_refused() {
        let s = scope();
        assert!(evaluate("dim / 3", &s).unwrap_err().contains("4096 / 3"));
        assert!(evaluate("dim / (heads - 32)", &s).unwrap_err().contains("divides by zero"));
        assert!(evaluate("hidden / 2", &s).unwrap_err().contains("`hidden` is not a defined constant"));
        assert!(evaluate("hidden", &Vec::new()).unwrap_err().contains("let NAME"));
        assert!(evaluate("9223372036854775807 + 1", &s).unwrap_err().contains("overflows"));
        assert!(evaluate("-9223372036854775807 - 2", &s).unwrap_err().contains("overflows"));
        assert!(evaluate("99999999999999999999", &s).unwrap_err().contains("i64"));
        assert!(evaluate("2.5", &s).unwrap_err().contains("'.'"));
        assert!(evaluate("(1 + 2", &s).unwrap_err().contains("not closed"));
        assert!(evaluate("1 2", &s).unwrap_err().contains("unexpected text"));
        assert!(evaluate("1 +", &s).unwrap_err().contains("not a complete"));
        assert!(evaluate("", &s).unwrap_err().contains("empty"));
        assert!(evaluate("12abc", &s).unwrap_err().contains("integer"));
        assert!(evaluate(&"(".repeat(10_000), &s).unwrap_err().contains("deeper"));
        assert!(evaluate(&"-".repeat(10_000), &s).unwrap_err().contains("deeper"));
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            /// Hostile expressions are answered, never a panic; what is
            /// answered is i64 arithmetic with exact division.
            #[test]
            fn expressions_never_panic(text in "[-+*/() 0-9a-z]{0,40}") {
                let _ = evaluate(&text, &vec![("a".into(), i64::MAX), ("b".into(), -1), ("z".into(), 0)]);
            }

            #[test]
            fn arithmetic_is_i64_arithmetic(a in -1000i64..1000, b in 1i64..50, c in -1000i64..1000) {
                let scope = vec![("a".into(), a), ("b".into(), b), ("c".into(), c)];
                prop_assert_eq!(evaluate("a * b + c", &scope), Ok(a * b + c));
                prop_assert_eq!(evaluate("(a - c) * b", &scope), Ok((a - c) * b));
                let exact = evaluate("a * b / b", &scope);
                prop_assert_eq!(exact, Ok(a));
                let divided = evaluate("a / b", &scope);
                prop_assert_eq!(divided.is_ok(), a % b == 0);
            }
        }
    }

    #[test]
    fn lets_define_once_and_sets_win() {
        let mut sets = Constants::new();
        sets.set("heads", 8).unwrap();
        assert_eq!(define(" heads = 32", &Vec::new(), &sets), Ok(("heads".into(), 8)));
        assert_eq!(define("dim = 64 * 2", &Vec::new(), &sets), Ok(("dim".into(), 128)));
        assert!(define("heads = 1", &scope(), &sets).unwrap_err().contains("twice"));
        assert!(define("2x = 1", &Vec::new(), &sets).unwrap_err().contains("not a constant's name"));
        assert!(define("x 1", &Vec::new(), &sets).unwrap_err().contains("let NAME = VALUE"));
        // A set value replaces the definition, which must still be valid.
        assert!(define("heads = nope", &Vec::new(), &sets).unwrap_err().contains("nope"));
        assert!(sets.set("a-b", 1).is_err());
        let mut sets = Constants::new();
        sets.set_text("heads=4").unwrap();
        assert_eq!(sets.get("heads"), Some(4));
        assert!(sets.set_text("heads").unwrap_err().to_string().contains("NAME=VALUE"));
        assert!(sets.set_text("heads=4.5").unwrap_err().to_string().contains("not an integer"));
    }
}
