//! The tokens file of `kd-coord broadcast --tokens FILE`: one `node token` line per node of the
//! set given with `-m` (blank lines and `#` comments allowed). Read with [`parse`] (pure: any
//! text gives a map or an error, never a panic); created with fresh tokens by
//! [`load_or_make`] when absent (mode 0600, written whole).
//!
//! The file and the node set must agree: a token for a node outside the set, a second line for
//! a node, or a node of the set without a token is an error naming the node (and the line).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};

/// Longest line quoted back in an error.
const QUOTE: usize = 60;

/// Why a tokens file was refused. Lines are 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokensError {
    /// Not `node token`.
    #[error("line {line}: expected `node token`, found {found:?}")]
    Syntax {
        /// Line.
        line: usize,
        /// The line (its start).
        found: String,
    },
    /// The token is not 1–128 of `[A-Za-z0-9_-]`.
    #[error("line {line}: the token of {node} must be 1 to 128 of A-Z a-z 0-9 _ -")]
    BadToken {
        /// Line.
        line: usize,
        /// Node.
        node: String,
    },
    /// A node that is not in the set.
    #[error("line {line}: {node} is not one of the nodes to serve ({nodes}): remove the line or add the node to -m")]
    UnknownNode {
        /// Line.
        line: usize,
        /// Node.
        node: String,
        /// The set, folded.
        nodes: String,
    },
    /// A node named twice.
    #[error("line {line}: a second token for {node} (the first is on line {first})")]
    Duplicate {
        /// Line.
        line: usize,
        /// Node.
        node: String,
        /// Line of the first one.
        first: usize,
    },
    /// Nodes of the set without a token.
    #[error("no token for {nodes}")]
    Missing {
        /// The nodes, folded.
        nodes: String,
    },
}

fn quote(line: &str) -> String {
    match line.char_indices().nth(QUOTE) {
        Some((i, _)) => format!("{}...", &line[..i]),
        None => line.to_string(),
    }
}

/// Reads `node token` lines for the node set `nodes`: every node of the set must have exactly
/// one token, and no other node may have one.
pub fn parse(text: &str, nodes: &[String]) -> Result<HashMap<String, String>, TokensError> {
    let wanted: std::collections::HashSet<&str> = nodes.iter().map(String::as_str).collect();
    let mut tokens: HashMap<String, String> = HashMap::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let mut words = l.split_whitespace();
        let (Some(node), Some(token), None) = (words.next(), words.next(), words.next()) else {
            return Err(TokensError::Syntax {
                line,
                found: quote(l),
            });
        };
        if !wanted.contains(node) {
            return Err(TokensError::UnknownNode {
                line,
                node: quote(node),
                nodes: kd_proto::nodeset::fold(nodes),
            });
        }
        if !crate::config::is_valid_token(token) {
            return Err(TokensError::BadToken {
                line,
                node: node.to_string(),
            });
        }
        if let Some(&first) = first_line.get(node) {
            return Err(TokensError::Duplicate {
                line,
                node: node.to_string(),
                first,
            });
        }
        first_line.insert(node.to_string(), line);
        tokens.insert(node.to_string(), token.to_string());
    }
    let missing: Vec<String> = nodes
        .iter()
        .filter(|n| !tokens.contains_key(*n))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(TokensError::Missing {
            nodes: kd_proto::nodeset::fold(&missing),
        });
    }
    Ok(tokens)
}

/// A fresh 128-bit token (32 hex digits) for each node, and the file text that lists them.
pub fn make(nodes: &[String]) -> Result<(HashMap<String, String>, String)> {
    let mut tokens = HashMap::new();
    let mut text = String::new();
    for n in nodes {
        let t = random_token()?;
        text.push_str(&format!("{n} {t}\n"));
        tokens.insert(n.clone(), t);
    }
    Ok((tokens, text))
}

/// 128 random bits as 32 hex digits.
pub fn random_token() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no random bytes for a token: {e}"))?;
    Ok(kd_proto::manifest::hex(&b))
}

/// Reads the tokens file `path` for `nodes`, or creates it with fresh tokens (mode 0600,
/// written whole: a reader never sees a part of it; when two `kd-coord` create it at once,
/// both use the one that was created first).
pub fn load_or_make(path: &Path, nodes: &[String]) -> Result<HashMap<String, String>> {
    if !path.exists() {
        let (tokens, text) = make(nodes)?;
        if crate::fsutil::create_new(path, text.as_bytes(), 0o600)
            .with_context(|| format!("write {}", path.display()))?
        {
            return Ok(tokens);
        }
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    parse(&text, nodes).with_context(|| format!("tokens file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> Vec<String> {
        kd_proto::nodeset::parse(s).unwrap()
    }

    #[test]
    fn reads_node_token_lines() {
        let t = parse("# tokens\n\nn1 aa\n  n2\tbb-_9  \n", &set("n[1-2]")).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t["n1"].as_str(), t["n2"].as_str()), ("aa", "bb-_9"));
    }

    #[test]
    fn a_node_outside_the_set_is_refused_with_its_line() {
        let e = parse("n1 a\nn9 b\nn2 c\n", &set("n[1-2]")).unwrap_err();
        assert_eq!(
            e,
            TokensError::UnknownNode {
                line: 2,
                node: "n9".into(),
                nodes: "n[1-2]".into()
            }
        );
        assert!(e.to_string().starts_with("line 2: n9 is not one"), "{e}");
    }

    #[test]
    fn a_node_named_twice_is_refused_with_both_lines() {
        let e = parse("n1 a\nn2 b\n# again\nn1 c\n", &set("n[1-2]")).unwrap_err();
        assert_eq!(
            e,
            TokensError::Duplicate {
                line: 4,
                node: "n1".into(),
                first: 1
            }
        );
        assert_eq!(
            e.to_string(),
            "line 4: a second token for n1 (the first is on line 1)"
        );
    }

    #[test]
    fn missing_tokens_and_bad_lines() {
        let e = parse("n2 a\n", &set("n[1-4]")).unwrap_err();
        assert_eq!(e.to_string(), "no token for n[1,3-4]");
        for (text, want) in [
            ("n1\n", "line 1: expected `node token`"),
            ("n1 a b\n", "line 1: expected `node token`"),
            ("n1 a\nn2 x/y\n", "line 2: the token of n2"),
            (
                &format!("n1 {}\n", "a".repeat(129)),
                "line 1: the token of n1",
            ),
        ] {
            let e = parse(text, &set("n[1-2]")).unwrap_err().to_string();
            assert!(e.starts_with(want), "{text:?}: {e}");
        }
        // A long line is quoted short.
        let e = parse(&format!("{} x y\n", "z".repeat(500)), &set("n1"))
            .unwrap_err()
            .to_string();
        assert!(e.len() < 120, "{e}");
    }

    #[test]
    fn parse_never_panics_on_odd_text() {
        let nodes = set("n[1-3]");
        for text in [
            "",
            "\n\n",
            "#",
            "\u{feff}n1 a",
            "n1 \u{e9}\u{e9}",
            "n1\u{a0}a",
            "\r\n",
            "n1 a\r\n",
            "\0 \0",
            "é",
            "n1 a\nn2 b\nn3 c",
            "   #n1 a",
        ] {
            let _ = parse(text, &nodes);
        }
        let long = "é".repeat(10_000);
        let _ = parse(&format!("{long} {long}"), &nodes);
    }

    #[test]
    fn the_file_is_created_whole_and_private_then_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokens");
        let nodes = set("n[1-3]");
        let a = load_or_make(&p, &nodes).unwrap();
        assert_eq!(a.len(), 3);
        assert!(a.values().all(|t| t.len() == 32));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        assert_eq!(load_or_make(&p, &nodes).unwrap(), a);
        // The same file for another set: the extra node is refused.
        let e = load_or_make(&p, &set("n[1-2]")).unwrap_err();
        assert!(format!("{e:#}").contains("n3 is not one"), "{e:#}");
    }
}
