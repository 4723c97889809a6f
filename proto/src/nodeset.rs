//! ClusterShell-style node sets: `node[1-8,10]`, `gdx-[05-12].site`, `r[1-2]n[1-3]`.
//!
//! [`parse`] expands a node set into node names; [`fold`] is its inverse (a compact form).
//!
//! Syntax, as accepted by [`parse`]:
//!
//! ```text
//! set     := element (sep element)*   sep: one ',' and/or whitespace, outside brackets
//! element := (literal | '[' group ']')+
//! group   := item (',' item)*
//! item    := num | num '-' num | num '-' num '/' step
//! ```
//!
//! * Ranges keep the width of their lower bound: `n[08-10]` is `n08 n09 n10`, `n[8-10]` is
//!   `n8 n9 n10`. A zero-padded bound needs a bound of the same width (`n[01-100]` is a
//!   padding mismatch), like ClusterShell.
//! * Several bracket groups in one element are a cartesian product, the rightmost group varying
//!   fastest: `r[1-2]n[1-2]` is `r1n1 r1n2 r2n1 r2n2`.
//! * Literal text may follow a group: `node[1-3]-eth0`, `gdx-[5-12].site`.
//! * The ClusterShell operators `!`, `&`, `^` and node groups `@name` are refused with an error.
//!
//! The expansion is bounded by [`MAX_NAMES`] names and about [`MAX_BYTES`] bytes, checked
//! before anything is expanded.

use std::collections::{HashMap, HashSet};

/// Most names a node set may expand to (before duplicates are removed).
pub const MAX_NAMES: usize = 1_000_000;
/// Most bytes of names a node set may expand to (an upper estimate, before duplicates are removed).
pub const MAX_BYTES: usize = 64 << 20;

/// A node set that cannot be parsed: where (a byte offset into the input) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad node set at byte {pos}: {kind}")]
pub struct NodeSetError {
    /// Byte offset in the input where the problem was found.
    pub pos: usize,
    /// What is wrong.
    pub kind: NodeSetErrorKind,
}

/// What is wrong with a node set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeSetErrorKind {
    /// The input holds no node at all.
    #[error("empty node set")]
    Empty,
    /// Two separating commas in a row, or a leading or trailing comma.
    #[error("empty element between commas")]
    EmptyElement,
    /// A `[` that is never closed.
    #[error("unbalanced bracket: '[' is never closed")]
    UnclosedBracket,
    /// A `]` without a `[` before it.
    #[error("unbalanced bracket: ']' without a matching '['")]
    UnopenedBracket,
    /// A `[` inside brackets.
    #[error("nested '[' inside brackets")]
    NestedBracket,
    /// `[]`, `[1,]`, `[-3]`, `[1-]`: a range or a bound is missing.
    #[error("empty range or missing bound")]
    EmptyRange,
    /// `[5-1]`.
    #[error("reversed range {lo}-{hi}")]
    ReversedRange {
        /// Lower bound as written.
        lo: u64,
        /// Upper bound as written.
        hi: u64,
    },
    /// A step that is not a positive integer, or a step on a single number (`[3/2]`).
    #[error("bad step {0:?}: expected a positive integer after a range (`[1-9/2]`)")]
    BadStep(String),
    /// A character other than a digit, `-`, `/` or `,` inside brackets.
    #[error("unexpected {0:?} inside brackets (digits, '-', '/' and ',' only)")]
    NonDigit(char),
    /// `[01-100]`, `[1-010]`: a zero-padded bound and a bound of another width.
    #[error("padding mismatch: {lo:?} and {hi:?} must have the same number of digits")]
    PaddingMismatch {
        /// Lower bound as written.
        lo: String,
        /// Upper bound as written.
        hi: String,
    },
    /// A number that does not fit in 64 bits.
    #[error("number {0:?} is too large")]
    NumberTooLarge(String),
    /// The set expands to more than [`MAX_NAMES`] names.
    #[error("node set expands to more than {} names", MAX_NAMES)]
    TooManyNames,
    /// The set expands to more than [`MAX_BYTES`] bytes of names.
    #[error("node set expands to more than {} bytes", MAX_BYTES)]
    TooManyBytes,
    /// A ClusterShell operator (`!`, `&`, `^`): kd node sets are unions only.
    #[error("operator {0:?} is not supported (kd node sets are unions only: use ',')")]
    UnsupportedOperator(char),
    /// A ClusterShell node group (`@rack1`).
    #[error("node groups ('@') are not supported")]
    UnsupportedGroup,
    /// A control character.
    #[error("invalid character {0:?}")]
    InvalidChar(char),
}

fn err(pos: usize, kind: NodeSetErrorKind) -> NodeSetError {
    NodeSetError { pos, kind }
}

/// One item of a bracket group: `lo-hi/step`, printed with at least `width` digits.
#[derive(Debug, Clone, Copy)]
struct Range {
    lo: u64,
    hi: u64,
    step: u64,
    width: usize,
}

impl Range {
    fn count(&self) -> u64 {
        ((self.hi - self.lo) / self.step).saturating_add(1)
    }

    fn values(&self) -> impl Iterator<Item = u64> {
        (self.lo..=self.hi).step_by(usize::try_from(self.step).unwrap_or(usize::MAX))
    }

    /// Longest name part this range prints.
    fn max_len(&self) -> usize {
        self.width.max(decimal_len(self.hi))
    }
}

fn decimal_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 10 {
        v /= 10;
        n += 1;
    }
    n
}

#[derive(Debug)]
enum Part {
    Lit(String),
    Group(Vec<Range>),
}

/// Expands a node set into node names.
///
/// Names come in order of appearance; a name seen twice is kept at its first place.
pub fn parse(s: &str) -> Result<Vec<String>, NodeSetError> {
    let mut elements = Vec::new();
    let mut names: u64 = 0;
    let mut bytes: u64 = 0;
    for (base, e) in split_elements(s)? {
        let parts = parse_element(e, base)?;
        let (count, len) = measure(&parts);
        names = names.saturating_add(count);
        bytes = bytes.saturating_add(count.saturating_mul(len as u64));
        if names > MAX_NAMES as u64 {
            return Err(err(base, NodeSetErrorKind::TooManyNames));
        }
        if bytes > MAX_BYTES as u64 {
            return Err(err(base, NodeSetErrorKind::TooManyBytes));
        }
        elements.push(parts);
    }
    let all: Vec<String> = elements.iter().flat_map(|parts| expand(parts)).collect();
    let keep: Vec<bool> = {
        let mut seen = HashSet::with_capacity(all.len());
        all.iter().map(|name| seen.insert(name.as_str())).collect()
    };
    Ok(all
        .into_iter()
        .zip(keep)
        .filter_map(|(name, first)| first.then_some(name))
        .collect())
}

/// Splits at top-level separators; returns `(byte offset, element)`. Checks the brackets.
fn split_elements(s: &str) -> Result<Vec<(usize, &str)>, NodeSetError> {
    use NodeSetErrorKind::*;
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let mut open: Option<usize> = None;
    // A separating comma not yet followed by an element.
    let mut comma: Option<usize> = None;
    for (i, c) in s.char_indices() {
        match c {
            '[' if open.is_some() => return Err(err(i, NestedBracket)),
            '[' => open = Some(i),
            ']' if open.is_none() => return Err(err(i, UnopenedBracket)),
            ']' => open = None,
            ',' if open.is_none() => {
                if let Some(st) = start.take() {
                    out.push((st, &s[st..i]));
                } else if comma.is_some() || out.is_empty() {
                    return Err(err(i, EmptyElement));
                }
                comma = Some(i);
                continue;
            }
            c if open.is_none() && c.is_whitespace() => {
                if let Some(st) = start.take() {
                    out.push((st, &s[st..i]));
                }
                continue;
            }
            _ => {}
        }
        if start.is_none() {
            start = Some(i);
            comma = None;
        }
    }
    if let Some(p) = open {
        return Err(err(p, UnclosedBracket));
    }
    if let Some(st) = start {
        out.push((st, &s[st..]));
    } else if let Some(p) = comma {
        return Err(err(p, EmptyElement));
    }
    if out.is_empty() {
        return Err(err(0, Empty));
    }
    Ok(out)
}

/// Parses one element (no top-level separator inside) starting at byte `base` of the input.
fn parse_element(e: &str, base: usize) -> Result<Vec<Part>, NodeSetError> {
    use NodeSetErrorKind::*;
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut i = 0;
    while let Some(c) = e[i..].chars().next() {
        let pos = base + i;
        match c {
            '[' => {
                let close = e[i + 1..].find(']').ok_or(err(pos, UnclosedBracket))? + i + 1;
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                parts.push(Part::Group(parse_group(&e[i + 1..close], pos + 1)?));
                i = close + 1;
                continue;
            }
            ']' => return Err(err(pos, UnopenedBracket)),
            '!' | '&' | '^' => return Err(err(pos, UnsupportedOperator(c))),
            '@' => return Err(err(pos, UnsupportedGroup)),
            c if c.is_control() || c.is_whitespace() => return Err(err(pos, InvalidChar(c))),
            c => lit.push(c),
        }
        i += c.len_utf8();
    }
    if !lit.is_empty() {
        parts.push(Part::Lit(lit));
    }
    Ok(parts)
}

fn parse_group(g: &str, base: usize) -> Result<Vec<Range>, NodeSetError> {
    let mut out = Vec::new();
    let mut off = 0;
    for item in g.split(',') {
        out.push(parse_item(item, base + off)?);
        off += item.len() + 1;
    }
    Ok(out)
}

fn is_padded(digits: &str) -> bool {
    digits.len() > 1 && digits.starts_with('0')
}

fn parse_item(item: &str, base: usize) -> Result<Range, NodeSetError> {
    use NodeSetErrorKind::*;
    let (range, step) = match item.find('/') {
        Some(p) => (&item[..p], Some((p + 1, &item[p + 1..]))),
        None => (item, None),
    };
    let (lo_s, hi) = match range.find('-') {
        Some(p) => (&range[..p], Some((p + 1, &range[p + 1..]))),
        None => (range, None),
    };
    let lo = parse_num(lo_s, base)?;
    let width = lo_s.len();
    let Some((hi_off, hi_s)) = hi else {
        if let Some((off, s)) = step {
            return Err(err(base + off, BadStep(s.to_owned())));
        }
        return Ok(Range {
            lo,
            hi: lo,
            step: 1,
            width,
        });
    };
    let hi = parse_num(hi_s, base + hi_off)?;
    if (is_padded(lo_s) || is_padded(hi_s)) && lo_s.len() != hi_s.len() {
        return Err(err(
            base,
            PaddingMismatch {
                lo: lo_s.to_owned(),
                hi: hi_s.to_owned(),
            },
        ));
    }
    if lo > hi {
        return Err(err(base, ReversedRange { lo, hi }));
    }
    let step = match step {
        None => 1,
        Some((off, s)) => match s.parse::<u64>() {
            Ok(v) if v > 0 && s.bytes().all(|b| b.is_ascii_digit()) => v,
            _ => return Err(err(base + off, BadStep(s.to_owned()))),
        },
    };
    Ok(Range {
        lo,
        hi,
        step,
        width,
    })
}

fn parse_num(s: &str, base: usize) -> Result<u64, NodeSetError> {
    use NodeSetErrorKind::*;
    if s.is_empty() {
        return Err(err(base, EmptyRange));
    }
    if let Some((i, c)) = s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        return Err(err(base + i, NonDigit(c)));
    }
    s.parse()
        .map_err(|_| err(base, NumberTooLarge(s.to_owned())))
}

/// Number of names an element expands to, and the length of its longest name (upper bounds).
fn measure(parts: &[Part]) -> (u64, usize) {
    let mut count: u64 = 1;
    let mut len: usize = 0;
    for p in parts {
        match p {
            Part::Lit(s) => len = len.saturating_add(s.len()),
            Part::Group(g) => {
                let n = g.iter().fold(0u64, |a, r| a.saturating_add(r.count()));
                count = count.saturating_mul(n);
                let l = g.iter().map(Range::max_len).max().unwrap_or(0);
                len = len.saturating_add(l);
            }
        }
    }
    (count, len)
}

/// Expands one element (already measured, so bounded).
fn expand(parts: &[Part]) -> Vec<String> {
    let mut acc = vec![String::new()];
    for p in parts {
        match p {
            Part::Lit(s) => acc.iter_mut().for_each(|a| a.push_str(s)),
            Part::Group(g) => {
                acc = acc
                    .iter()
                    .flat_map(|prefix| {
                        g.iter().flat_map(move |r| {
                            let w = r.width;
                            r.values().map(move |v| format!("{prefix}{v:0w$}"))
                        })
                    })
                    .collect();
            }
        }
    }
    acc
}

/// Folds node names into a compact node set: `n1 n2 n3 n5` becomes `n[1-3,5]`.
///
/// Names are grouped by the text around one of their digit runs (for each name, the run shared
/// with the most other names; the last run on a tie), so `n1-eth0 n2-eth0` folds into
/// `n[1-2]-eth0`. Only one bracket group is used per element (no cartesian folding). Zero
/// padding is kept: `n08 n09 n10` folds into `n[08-10]`. Elements come in order of first
/// appearance; numbers in a bracket are sorted.
///
/// `parse(&fold(x))` yields the same set as `x` when every name is a valid node name (as
/// [`parse`] produces them: not empty, no brackets, commas, whitespace, `!&^@` or control
/// characters). Other names are copied as they are and will not parse back.
pub fn fold(names: &[String]) -> String {
    let mut seen = HashSet::new();
    let uniq: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| seen.insert(*n))
        .collect();
    let runs: Vec<Vec<(usize, usize)>> = uniq.iter().map(|n| digit_runs(n)).collect();
    let mut counts: HashMap<(&str, &str), usize> = HashMap::new();
    for (name, rs) in uniq.iter().zip(&runs) {
        for &(a, b) in rs {
            *counts.entry((&name[..a], &name[b..])).or_default() += 1;
        }
    }

    enum Out<'a> {
        Plain(&'a str),
        Group(usize),
    }
    // (prefix, suffix, numbers as written)
    let mut groups: Vec<(&str, &str, Vec<&str>)> = Vec::new();
    let mut group_of: HashMap<(&str, &str), usize> = HashMap::new();
    let mut out: Vec<Out<'_>> = Vec::new();
    for (name, rs) in uniq.iter().zip(&runs) {
        let best = rs
            .iter()
            .max_by_key(|&&(a, b)| counts.get(&(&name[..a], &name[b..])).copied());
        let Some(&(a, b)) = best else {
            out.push(Out::Plain(name));
            continue;
        };
        let key = (&name[..a], &name[b..]);
        let g = *group_of.entry(key).or_insert_with(|| {
            groups.push((key.0, key.1, Vec::new()));
            out.push(Out::Group(groups.len() - 1));
            groups.len() - 1
        });
        groups[g].2.push(&name[a..b]);
    }

    let rendered: Vec<String> = out
        .iter()
        .map(|o| match o {
            Out::Plain(name) => (*name).to_owned(),
            Out::Group(g) => {
                let (prefix, suffix, nums) = &groups[*g];
                match nums.as_slice() {
                    [one] => format!("{prefix}{one}{suffix}"),
                    _ => format!("{prefix}[{}]{suffix}", fold_numbers(nums)),
                }
            }
        })
        .collect();
    rendered.join(",")
}

/// Maximal runs of ASCII digits that fit in a `u64`, as byte ranges.
/// The nodes of a node file (an OAR/Slurm node file: one name per line, repeated once per
/// core): each non-empty line not starting with `#` is a node set; the union, first
/// appearance first, without duplicates. An error names its line (from 1).
pub fn from_lines(text: &str) -> Result<Vec<String>, (usize, NodeSetError)> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        for n in parse(l).map_err(|e| (i + 1, e))? {
            if seen.insert(n.clone()) {
                out.push(n);
            }
        }
    }
    if out.is_empty() {
        return Err((0, err(0, NodeSetErrorKind::Empty)));
    }
    Ok(out)
}

/// Orders names as people read them: digit runs compare as numbers (`node2` < `node10`).
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn key(s: &str) -> Vec<(bool, u128, &str)> {
        let mut out = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.starts_with(|c: char| c.is_ascii_digit());
            let end = rest
                .find(|c: char| c.is_ascii_digit() != digits)
                .unwrap_or(rest.len());
            let (run, tail) = rest.split_at(end);
            let n = if digits {
                run.parse().unwrap_or(u128::MAX)
            } else {
                0
            };
            out.push((digits, n, run));
            rest = tail;
        }
        out
    }
    key(a).cmp(&key(b)).then_with(|| a.cmp(b))
}

fn digit_runs(name: &str) -> Vec<(usize, usize)> {
    let b = name.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            if name[start..i].parse::<u64>().is_ok() {
                out.push((start, i));
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Folds distinct digit strings into the inside of a bracket group: `1-3,5,08-10`.
fn fold_numbers(nums: &[&str]) -> String {
    // Width class: a padded number has its own width; a natural number joins the class of
    // padded numbers of its length if there is one (`09,10` is `09-10`), else class 0 (natural).
    let padded: HashSet<usize> = nums
        .iter()
        .filter(|s| is_padded(s))
        .map(|s| s.len())
        .collect();
    let mut vals: Vec<(usize, u64)> = nums
        .iter()
        .filter_map(|s| {
            let class = if padded.contains(&s.len()) {
                s.len()
            } else {
                0
            };
            s.parse::<u64>().ok().map(|v| (class, v))
        })
        .collect();
    vals.sort_unstable();
    // Consecutive runs within one class: (class, lo, hi).
    let mut ranges: Vec<(usize, u64, u64)> = Vec::new();
    for (class, v) in vals {
        match ranges.last_mut() {
            Some((c, _, hi)) if *c == class && hi.checked_add(1) == Some(v) => *hi = v,
            _ => ranges.push((class, v, v)),
        }
    }
    ranges.sort_by_key(|&(class, lo, _)| (lo, class));
    ranges
        .iter()
        .map(|&(w, lo, hi)| {
            if lo == hi {
                format!("{lo:0w$}")
            } else {
                format!("{lo:0w$}-{hi:0w$}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Vec<String> {
        match parse(s) {
            Ok(v) => v,
            Err(e) => panic!("{s:?}: {e}"),
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn kind(s: &str) -> (usize, NodeSetErrorKind) {
        match parse(s) {
            Ok(v) => panic!("{s:?} parsed into {v:?}"),
            Err(e) => (e.pos, e.kind),
        }
    }

    fn set(v: &[String]) -> HashSet<&str> {
        v.iter().map(String::as_str).collect()
    }

    #[test]
    fn plain_names_and_unions() {
        assert_eq!(p("node1"), names(&["node1"]));
        assert_eq!(p("a[1-2],b1 c3"), names(&["a1", "a2", "b1", "c3"]));
        assert_eq!(p("  a ,\tb\n"), names(&["a", "b"]));
        assert_eq!(p("a, b"), names(&["a", "b"]));
    }

    #[test]
    fn ranges_in_order_of_appearance_without_duplicates() {
        assert_eq!(
            p("node[1-8,10]"),
            names(&[
                "node1", "node2", "node3", "node4", "node5", "node6", "node7", "node8", "node10"
            ])
        );
        assert_eq!(p("n[3,1-2]"), names(&["n3", "n1", "n2"]));
        assert_eq!(
            p("n[1-3],n[2-5] n1"),
            names(&["n1", "n2", "n3", "n4", "n5"])
        );
        assert_eq!(p("[1-3]"), names(&["1", "2", "3"]));
    }

    #[test]
    fn zero_padding_keeps_the_lower_bound_width() {
        let v = p("node[01-16]");
        assert_eq!(v.len(), 16);
        assert_eq!(v[0], "node01");
        assert_eq!(v[8], "node09");
        assert_eq!(v[15], "node16");
        assert_eq!(p("n[08-10]"), names(&["n08", "n09", "n10"]));
        assert_eq!(p("n[8-10]"), names(&["n8", "n9", "n10"]));
        assert_eq!(p("n[00-02]"), names(&["n00", "n01", "n02"]));
        assert_eq!(p("n[007]"), names(&["n007"]));
        assert_eq!(p("n[9-10,09]"), names(&["n9", "n10", "n09"]));
        assert_eq!(p("n[0-1]"), names(&["n0", "n1"]));
    }

    #[test]
    fn steps() {
        assert_eq!(
            p("node[1-10/2]"),
            names(&["node1", "node3", "node5", "node7", "node9"])
        );
        assert_eq!(p("n[0-9/5]"), names(&["n0", "n5"]));
        assert_eq!(p("n[4-4/3]"), names(&["n4"]));
        assert_eq!(p("n[1-2/100]"), names(&["n1"]));
    }

    #[test]
    fn cartesian_product_left_to_right() {
        assert_eq!(
            p("r[1-2]n[1-3]"),
            names(&["r1n1", "r1n2", "r1n3", "r2n1", "r2n2", "r2n3"])
        );
        assert_eq!(p("[1-2][0-1]"), names(&["10", "11", "20", "21"]));
        assert_eq!(
            p("x[1-2]y[0-1]z"),
            names(&["x1y0z", "x1y1z", "x2y0z", "x2y1z"])
        );
    }

    #[test]
    fn suffixes_and_domains() {
        assert_eq!(
            p("node[1-3]-eth0"),
            names(&["node1-eth0", "node2-eth0", "node3-eth0"])
        );
        let v = p("gdx-[5-12].site");
        assert_eq!(v.len(), 8);
        assert_eq!(v[0], "gdx-5.site");
        assert_eq!(v[7], "gdx-12.site");
    }

    #[test]
    fn node_files_are_unions_without_duplicates() {
        let f = "node3\nnode3\n# a comment\n\n  node1  \nnode[1-2]\nnode3\n";
        assert_eq!(from_lines(f).unwrap(), names(&["node3", "node1", "node2"]));
        let (line, e) = from_lines("node1\nnode[2-\n").unwrap_err();
        assert_eq!(line, 2);
        assert_eq!(e.kind, NodeSetErrorKind::UnclosedBracket);
        assert_eq!(
            from_lines("\n# none\n").unwrap_err().1.kind,
            NodeSetErrorKind::Empty
        );
    }

    #[test]
    fn natural_order_reads_numbers_as_numbers() {
        let mut v = vec!["node10", "node2", "node1", "gpu3", "node02", "n"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, vec!["gpu3", "n", "node1", "node02", "node2", "node10"]);
    }

    #[test]
    fn errors_name_the_place() {
        use NodeSetErrorKind::*;
        assert_eq!(kind(""), (0, Empty));
        assert_eq!(kind(" \t\n"), (0, Empty));
        assert_eq!(kind("n[1-2"), (1, UnclosedBracket));
        assert_eq!(kind("n1]"), (2, UnopenedBracket));
        assert_eq!(kind("n[1[2]]"), (3, NestedBracket));
        assert_eq!(kind("n[]"), (2, EmptyRange));
        assert_eq!(kind("n[1,]"), (4, EmptyRange));
        assert_eq!(kind("n[-3]"), (2, EmptyRange));
        assert_eq!(kind("n[1-]"), (4, EmptyRange));
        assert_eq!(kind("ab,n[5-1]"), (5, ReversedRange { lo: 5, hi: 1 }));
        assert_eq!(kind("n[1-10/0]"), (7, BadStep("0".into())));
        assert_eq!(kind("n[1-10/]"), (7, BadStep("".into())));
        assert_eq!(kind("n[1-10/x]"), (7, BadStep("x".into())));
        assert_eq!(kind("n[1-10/+2]"), (7, BadStep("+2".into())));
        assert_eq!(kind("n[3/2]"), (4, BadStep("2".into())));
        assert_eq!(kind("n[1-a]"), (4, NonDigit('a')));
        assert_eq!(kind("n[1 -2]"), (3, NonDigit(' ')));
        assert_eq!(kind("n[1-2-3]"), (5, NonDigit('-')));
        assert_eq!(
            kind("n[01-100]"),
            (
                2,
                PaddingMismatch {
                    lo: "01".into(),
                    hi: "100".into()
                }
            )
        );
        assert_eq!(
            kind("n[1-010]"),
            (
                2,
                PaddingMismatch {
                    lo: "1".into(),
                    hi: "010".into()
                }
            )
        );
        assert_eq!(
            kind("n[99999999999999999999]"),
            (2, NumberTooLarge("99999999999999999999".into()))
        );
        assert_eq!(kind("n[1-1000001]"), (0, TooManyNames));
        assert_eq!(kind("a[1-1000]b[1-1000]c[1-1000]"), (0, TooManyNames));
        assert_eq!(kind("n[0-18446744073709551615]"), (0, TooManyNames));
        assert_eq!(kind("x n[1-600000],m[1-600000]"), (14, TooManyNames));
        let long = format!("{}[1-100000]", "x".repeat(1000));
        assert_eq!(kind(&long), (0, TooManyBytes));
        assert_eq!(kind("n[1-3]!n2"), (6, UnsupportedOperator('!')));
        assert_eq!(kind("n[1-3]&n2"), (6, UnsupportedOperator('&')));
        assert_eq!(kind("n[1-3]^n2"), (6, UnsupportedOperator('^')));
        assert_eq!(kind("@rack1"), (0, UnsupportedGroup));
        assert_eq!(kind("a\u{0}b"), (1, InvalidChar('\u{0}')));
        assert_eq!(kind("a,,b"), (2, EmptyElement));
        assert_eq!(kind(",a"), (0, EmptyElement));
        assert_eq!(kind("a, "), (1, EmptyElement));
    }

    #[test]
    fn error_messages_are_clear() {
        let e = parse("node[5-1]").unwrap_err();
        assert_eq!(e.to_string(), "bad node set at byte 5: reversed range 5-1");
        let e = parse("node[1-3").unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad node set at byte 4: unbalanced bracket: '[' is never closed"
        );
    }

    #[test]
    fn exactly_the_limit_is_accepted() {
        assert_eq!(parse("n[1-1000000]").unwrap().len(), MAX_NAMES);
    }

    #[test]
    fn fold_examples() {
        let f = |s: &str| fold(&p(s));
        assert_eq!(f("n1,n2,n3,n5"), "n[1-3,5]");
        assert_eq!(f("n5,n3,n1,n2"), "n[1-3,5]");
        assert_eq!(f("node[01-16]"), "node[01-16]");
        assert_eq!(f("n[08-12]"), "n[08-12]");
        assert_eq!(f("n[8-12]"), "n[8-12]");
        assert_eq!(f("n[9-10,09]"), "n[9,09-10]");
        assert_eq!(f("node[1-3]-eth0"), "node[1-3]-eth0");
        assert_eq!(f("gdx-[5-12].site,b1 c"), "gdx-[5-12].site,b1,c");
        assert_eq!(f("a[1-2],b[3-4],a3"), "a[1-3],b[3-4]");
        assert_eq!(f("r[1-2]n[1-2]"), "r1n[1-2],r2n[1-2]");
        assert_eq!(f("[1-3]"), "[1-3]");
        assert_eq!(fold(&[]), "");
        assert_eq!(
            fold(&names(&["n18446744073709551615", "n18446744073709551614"])),
            "n[18446744073709551614-18446744073709551615]"
        );
    }

    fn name_strategy() -> impl Strategy<Value = String> {
        (
            prop::sample::select(vec!["node", "n", "gdx-", "a.b", "", "r1n", "x-7-"]),
            0u64..3000,
            0usize..5,
            prop::sample::select(vec!["", ".site", "-eth0", "-", "x9y"]),
        )
            .prop_map(|(pre, num, width, suf)| format!("{pre}{num:0width$}{suf}"))
    }

    proptest! {
        #[test]
        fn fold_then_parse_is_the_same_set(v in prop::collection::vec(name_strategy(), 1..60)) {
            let folded = fold(&v);
            let back = parse(&folded).map_err(|e| TestCaseError::fail(format!("{folded:?}: {e}")))?;
            prop_assert_eq!(set(&back), set(&v), "folded: {}", folded);
            prop_assert_eq!(back.len(), set(&v).len());
        }

        #[test]
        fn parse_never_panics_on_syntax_soup(s in "[\\[\\]0-9a-c,\\-/ !^&@.\t]{0,40}") {
            if let Ok(v) = parse(&s) {
                let back = parse(&fold(&v)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(set(&back), set(&v));
            }
        }

        #[test]
        fn parse_never_panics_on_any_string(s in "\\PC{0,60}|.{0,60}") {
            if let Ok(v) = parse(&s) {
                prop_assert!(!v.is_empty());
                let back = parse(&fold(&v)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(set(&back), set(&v));
            }
        }

        #[test]
        fn ranges_match_a_reference(lo in 0u64..500, len in 0u64..300, step in 1u64..20, pad in 0usize..5) {
            let hi = lo + len;
            let w = if pad > 0 { decimal_len(hi).max(pad) } else { 0 };
            let s = format!("h[{lo:0w$}-{hi:0w$}/{step}]");
            let expected: Vec<String> = (lo..=hi).step_by(step as usize).map(|v| format!("h{v:0w$}")).collect();
            prop_assert_eq!(parse(&s).map_err(|e| TestCaseError::fail(e.to_string()))?, expected);
        }
    }
}
