//! From spans and parser messages to `file:line:col: key: reason` errors: line and column,
//! the dotted key of a span, serde's messages in a policy author's words, and "did you mean".

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::super::{ErrorKind, Located};

/// Turns spans into `file:line:col: key: reason` errors, and keeps those found so far.
pub(super) struct Ctx<'a> {
    text: &'a str,
    file: &'a Path,
    /// In the order the checks found them.
    found: RefCell<Vec<Located>>,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(text: &'a str, file: &'a Path) -> Ctx<'a> {
        Ctx {
            text,
            file,
            found: RefCell::new(Vec::new()),
        }
    }

    /// Keep `error` for the report.
    pub(super) fn report(&self, error: Located) {
        self.found.borrow_mut().push(error);
    }

    /// The value, or `None` once its error is kept for the report.
    pub(super) fn keep<T>(&self, result: Result<T, Located>) -> Option<T> {
        result.map_err(|e| self.report(e)).ok()
    }

    /// Every value, or `None` once the error of each bad one is kept (all are checked).
    pub(super) fn all<T>(
        &self,
        results: impl IntoIterator<Item = Result<T, Located>>,
    ) -> Option<Vec<T>> {
        let kept: Vec<Option<T>> = results.into_iter().map(|r| self.keep(r)).collect();
        kept.into_iter().collect()
    }

    /// The errors found, in the order the checks ran.
    pub(super) fn into_found(self) -> Vec<Located> {
        self.found.into_inner()
    }
    fn error(&self, kind: ErrorKind, span: Range<usize>, key: String, reason: String) -> Located {
        let (line, col) = line_col(self.text, span.start);
        Located {
            file: self.file.to_path_buf(),
            line,
            col,
            key,
            reason,
            kind,
        }
    }

    /// A validation error at `span`.
    pub(super) fn err(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> Located {
        self.error(ErrorKind::Invalid, span, key.into(), reason.into())
    }

    /// A validation error at a value.
    pub(super) fn at<T>(
        &self,
        value: &Spanned<T>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> Located {
        self.err(value.span(), key, reason)
    }

    /// The TOML parser refused the text.
    pub(super) fn syntax(&self, e: &toml::de::Error) -> Located {
        let span = e.span().unwrap_or(0..0);
        let message = one_line(e.message());
        let reason = if message.starts_with("duplicate key") {
            format!("{message}; a key may appear once in a table, keep one")
        } else {
            format!("{message}; fix the TOML syntax")
        };
        self.error(
            ErrorKind::Syntax,
            span.clone(),
            syntax_key(self.text, span.start),
            reason,
        )
    }

    /// serde refused the shape: an unknown or missing key, or a value of the wrong type.
    pub(super) fn shape(&self, e: &toml::de::Error) -> Located {
        self.shape_at(e.message(), e.span().unwrap_or(0..0))
    }

    /// [`Ctx::shape`] for a serde `message` about `span`.
    pub(super) fn shape_at(&self, message: &str, span: Range<usize>) -> Located {
        let message = one_line(message);
        let path = DeTable::parse(self.text)
            .map(|doc| path_at(&doc, &span))
            .unwrap_or_default();
        if let Some(field) = backticked(&message, "unknown field `") {
            // The span is the key itself, so the path normally ends with it already.
            let own = push_key(String::new(), field);
            let key = if path == own || path.ends_with(&format!(".{own}")) {
                path
            } else {
                push_key(path, field)
            };
            let expected = message.split_once(", expected ").map(|(_, e)| e);
            let reason = match expected.and_then(|e| closest(field, e)) {
                Some(near) => format!("unknown key `{field}`; did you mean `{near}`?"),
                None => match expected {
                    Some(e) => format!(
                        "unknown key `{field}`; remove it (allowed here: {})",
                        e.strip_prefix("one of ").unwrap_or(e)
                    ),
                    None => format!("unknown key `{field}`; remove it (see policy/example.toml)"),
                },
            };
            self.error(ErrorKind::UnknownKey, span, key, reason)
        } else if let Some(field) = backticked(&message, "missing field `") {
            let key = push_key(path, field);
            let reason = match example_for(field) {
                Some(example) => format!("required key is missing; add {example}"),
                None => format!("required key is missing; add {field} (see policy/example.toml)"),
            };
            self.error(ErrorKind::MissingKey, span, key, reason)
        } else {
            let key = if path.is_empty() {
                "(document)".to_string()
            } else {
                path
            };
            let reason = format!(
                "{}; see policy/example.toml for the expected form",
                humanize(&message)
            );
            self.error(ErrorKind::Invalid, span, key, reason)
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |nl| nl + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// A parser message on one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(", ")
}

/// serde's type names in the words of a policy author.
fn humanize(message: &str) -> String {
    message
        .replace("expected i64", "expected an integer")
        .replace("expected a sequence", "expected an array")
        .replace("invalid type: sequence", "invalid type: array")
        .replace("invalid type: map", "invalid type: table")
        .replace("expected a map", "expected a table")
}

/// The name in `` prefix`name` ``.
fn backticked<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    message.strip_prefix(prefix)?.split('`').next()
}

/// What to write for a required key.
fn example_for(field: &str) -> Option<&'static str> {
    Some(match field {
        "vm" => "a [vm] table with name, mac and address",
        "name" => "name = \"sandbox-17\"",
        "mac" => "mac = \"52:54:00:12:34:56\"",
        "address" => "address = \"10.0.0.2/30\"",
        "protocol" => "protocol = \"tcp\"",
        "ports" => "ports = [443]",
        "listen" => "listen = \"127.0.0.1:8080\"",
        "guest_port" => "guest_port = 3000",
        _ => return None,
    })
}

/// The expected key nearest to a misspelt one, from serde's "`a`, `b` or `c`" / "one of
/// `a`, `b`" list: one edit away, or two for keys of six characters or more. Edits are those of
/// the optimal string alignment distance: insertions, deletions, substitutions and swaps of two
/// neighbours (`nmae` is one step from `name`).
fn closest<'e>(field: &str, expected: &'e str) -> Option<&'e str> {
    let most = if field.chars().count() >= 6 { 2 } else { 1 };
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|k| (strsim::osa_distance(field, k), k))
        .filter(|(d, _)| *d <= most)
        .min()
        .map(|(_, k)| k)
}

/// `path.key`, quoting the key when it is not a bare TOML key (`dns.records."api.internal"`).
pub(super) fn push_key(mut path: String, key: &str) -> String {
    if !path.is_empty() {
        path.push('.');
    }
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if bare {
        path.push_str(key);
    } else {
        path.push_str(&format!("{key:?}"));
    }
    path
}

/// The dotted path of the deepest key or value whose span covers `span`: `vm.mac`,
/// `outbound[1].ports`. Arrays of tables get an index; elements of other arrays do not.
/// An empty span at the start of the document (serde's place for a missing top-level key)
/// is the document itself.
fn path_at(doc: &Spanned<DeTable<'_>>, span: &Range<usize>) -> String {
    let mut path = String::new();
    if *span != doc.span() && !(span.is_empty() && span.start == 0) {
        locate(doc.get_ref(), span, &mut path);
    }
    path
}

fn covers(outer: Range<usize>, inner: &Range<usize>) -> bool {
    outer.start < outer.end && outer.start <= inner.start && inner.end <= outer.end
}

fn locate(table: &DeTable<'_>, span: &Range<usize>, path: &mut String) -> bool {
    for (key, value) in table.iter() {
        let mut child = push_key(path.clone(), key.get_ref());
        if descend(value, span, &mut child)
            || covers(key.span(), span)
            || covers(value.span(), span)
        {
            *path = child;
            return true;
        }
    }
    false
}

fn descend(value: &Spanned<DeValue<'_>>, span: &Range<usize>, path: &mut String) -> bool {
    match value.get_ref() {
        DeValue::Table(table) => locate(table, span, path),
        DeValue::Array(items) => items.iter().enumerate().any(|(i, item)| {
            let DeValue::Table(table) = item.get_ref() else {
                return false;
            };
            let mut element = format!("{path}[{i}]");
            let hit = locate(table, span, &mut element) || covers(item.span(), span);
            if hit {
                *path = element;
            }
            hit
        }),
        _ => false,
    }
}

/// For a syntax error there is no tree to search: the table whose header comes last before
/// `offset` (with `[[array]]` indices), and the key on the error's line if it has one.
fn syntax_key(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text[line_start..line_end].trim();
    let mut table = String::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let header_lines = text[..line_start]
        .lines()
        .chain(line.starts_with('[').then_some(line));
    for l in header_lines.map(str::trim) {
        if let Some(name) = l.strip_prefix("[[").and_then(|s| s.split("]]").next()) {
            let name = name.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = l.strip_prefix('[').and_then(|s| s.split(']').next()) {
            table = name.trim().to_string();
        }
    }
    let key = if line.starts_with('[') {
        ""
    } else {
        line.split_once('=').map_or("", |(k, _)| k.trim())
    };
    let key_ok = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.\"'".contains(&b));
    match (table.is_empty(), key_ok) {
        (true, false) => "(document)".to_string(),
        (true, true) => key.to_string(),
        (false, false) => table,
        (false, true) => format!("{table}.{key}"),
    }
}
