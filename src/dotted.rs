//! Dotted tensor names (`features.3.bn.running_mean`): the module path and the
//! leaf, and the natural order of names. One place for both, imported by the
//! matchers, the plan and the stores.
use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::OnceLock;

/// `("features.3.bn", "running_mean")`; a name without a dot is a leaf of the root
/// module `""`.
pub fn module_and_leaf(name: &str) -> (&str, &str) {
    name.rsplit_once('.').unwrap_or(("", name))
}

/// The leaf of a name: its last dot-separated part.
pub fn leaf(name: &str) -> &str {
    module_and_leaf(name).1
}

/// Whether a path segment is an index (`Sequential`/`ModuleList` children are
/// named `0`, `1`, …).
pub fn is_index(segment: &str) -> bool {
    !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit())
}

/// Compares two segments: indices as numbers (any length), before names, which
/// compare as text.
fn segment_cmp(x: &str, y: &str) -> Ordering {
    match (is_index(x), is_index(y)) {
        (true, true) => {
            let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
            x.len().cmp(&y.len()).then_with(|| x.cmp(y))
        }
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => x.cmp(y),
    }
}

/// Natural order of dotted names: segment by segment, indices as numbers
/// (`layer.2` before `layer.10`), a name before the names it is a prefix of
/// (`a` before `a.b`: a module's own tensors come before its children's, as in
/// PyTorch's `state_dict`).
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    if a == b {
        return Ordering::Equal;
    }
    let (mut left, mut right) = (segments(a), segments(b));
    loop {
        match (left.next(), right.next()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => match segment_cmp(x, y) {
                Ordering::Equal => {}
                order => return order,
            },
        }
    }
}

/// The segments of a module path; the root module `""` has none.
pub fn segments(path: &str) -> impl Iterator<Item = &str> {
    (!path.is_empty()).then(|| path.split('.')).into_iter().flatten()
}

/// Characters that reorder or hide text on a terminal without being control
/// characters: the bidirectional overrides, embeddings and isolates (U+202A–E,
/// U+2066–9), the direction marks (U+200E/F, U+061C), and the zero-width and
/// line/paragraph separators that would let two different names look alike or
/// break a line.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{061c}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}'
            | '\u{feff}'
    )
}

/// `text` as a terminal may show it: control characters written as escapes
/// (`\n`, `\t`, `\x1b`), and bidirectional overrides and other invisible
/// formatting characters as `\u{202e}`, so that a name read from a file can
/// neither start a line of its own (a forged `verdict:`), send escape
/// sequences, nor show its characters in another order than they are. JSON
/// output is not escaped this way: it is exact.
pub fn escaped(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() || is_invisible(c)) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c if is_invisible(c) => out.push_str(&format!("\\u{{{:04x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The most characters of a name a table shows.
pub const SHOWN_CHARS: usize = 200;

/// `text` escaped (see [`escaped`]) and, if longer than [`SHOWN_CHARS`],
/// cut there with a mark that says so and how long it was:
/// `layer.…(1048576 chars)`. For tables, whose columns are as wide as their
/// longest cell.
pub fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    let out = escaped(text);
    match out.char_indices().nth(SHOWN_CHARS) {
        None => out,
        Some((cut, _)) => {
            std::borrow::Cow::Owned(format!("{}…({} chars)", &out[..cut], text.chars().count()))
        }
    }
}

/// Finds names among a list of unique names, trying first the position a name
/// is expected at: two models of one architecture list the same names in the
/// same order, so that is where a name usually is, and the index of every name
/// is only built on the first miss.
pub struct NameLookup<'a> {
    names: Vec<&'a str>,
    index: OnceLock<HashMap<&'a str, usize>>,
}

impl<'a> NameLookup<'a> {
    /// A lookup over `names` (unique).
    pub fn new(names: impl IntoIterator<Item = &'a str>) -> Self {
        Self { names: names.into_iter().collect(), index: OnceLock::new() }
    }

    /// The position of `name`, checking `expected` first.
    pub fn find(&self, name: &str, expected: usize) -> Option<usize> {
        if self.names.get(expected) == Some(&name) {
            return Some(expected);
        }
        let index = self.index.get_or_init(|| self.names.iter().enumerate().map(|(j, n)| (*n, j)).collect());
        index.get(name).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_compare_as_numbers_and_parents_come_first() {
        let mut names = vec![
            "features.10.0",
            "features.2.1",
            "features.2",
            "classifier",
            "features.2.0",
            "",
            "features.02a",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            ["", "classifier", "features.2", "features.2.0", "features.2.1", "features.10.0", "features.02a"]
        );
        assert_eq!(natural_cmp("a.99999999999999999999999", "a.100000000000000000000000"), Ordering::Less);
        assert_eq!(natural_cmp("a.007", "a.7"), "a.007".cmp("a.7"), "equal numbers still order totally");
    }

    #[test]
    fn control_characters_are_shown_as_escapes() {
        assert_eq!(escaped("fc.weight"), "fc.weight");
        assert_eq!(escaped("a\nverdict: complete"), "a\\nverdict: complete");
        assert_eq!(escaped("\u{1b}[31mred"), "\\x1b[31mred");
        assert_eq!(escaped("tab\there\u{7f}"), "tab\\there\\x7f");
        assert_eq!(
            escaped("a\u{202e}b\u{2066}\u{2069}\u{200e}\u{200f}"),
            "a\\u{202e}b\\u{2066}\\u{2069}\\u{200e}\\u{200f}"
        );
        assert_eq!(escaped("épée.权重"), "épée.权重");
    }

    #[test]
    fn long_names_are_cut_in_tables_and_say_so() {
        assert_eq!(shown("fc.weight"), "fc.weight");
        let long = "é".repeat(1 << 20);
        let cut = shown(&long);
        assert!(cut.ends_with("…(1048576 chars)"), "{}", &cut[cut.len() - 40..]);
        assert_eq!(cut.chars().count(), SHOWN_CHARS + "…(1048576 chars)".chars().count());
        let exact = "a".repeat(SHOWN_CHARS);
        assert_eq!(shown(&exact), exact);
    }

    #[test]
    fn lookups_try_the_expected_place_then_the_index() {
        let lookup = NameLookup::new(["a", "b", "c"]);
        assert_eq!(lookup.find("b", 1), Some(1));
        assert!(lookup.index.get().is_none(), "no index built while names are where expected");
        assert_eq!(lookup.find("c", 0), Some(2));
        assert_eq!(lookup.find("z", 0), None);
    }

    #[test]
    fn module_and_leaf_split_at_the_last_dot() {
        assert_eq!(module_and_leaf("a.b.weight"), ("a.b", "weight"));
        assert_eq!(module_and_leaf("temperature"), ("", "temperature"));
        assert_eq!(segments("").count(), 0);
        assert_eq!(segments("a.0").collect::<Vec<_>>(), ["a", "0"]);
    }
}
