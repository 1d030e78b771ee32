//! Where a span sits in a TOML document: line, column and field path.
//!
//! The path is dotted, as `plans[0].throttle.rate`, and is read from the text
//! itself, so that serde's own errors name a field too.

use std::collections::HashMap;
use std::ops::Range;

/// Line and column (from 1) of byte `offset` in `src`.
pub(super) fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

/// The dotted path of the field at `span`: the table header above it, then the
/// keys of the inline tables that enclose it on its line, then the key itself
/// when the span is a key (an unknown field).
pub(super) fn path_at(src: &str, span: Range<usize>) -> String {
    let start = span.start.min(src.len());
    let line_start = src[..start].rfind('\n').map_or(0, |p| p + 1);
    let mut header: Vec<String> = Vec::new();
    let mut arrays: HashMap<String, usize> = HashMap::new();
    for line in src[..line_start].lines() {
        let t = line.trim();
        let (array, name) = if let Some(n) = t.strip_prefix("[[").and_then(|r| r.split("]]").next())
        {
            (true, n)
        } else if let Some(n) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            (false, n)
        } else {
            continue;
        };
        let name = name.trim();
        if array {
            *arrays.entry(name.to_owned()).or_default() += 1;
        }
        header.clear();
        let mut prefix = String::new();
        for part in name.split('.') {
            let part = part.trim().trim_matches('"');
            if !prefix.is_empty() {
                prefix.push('.');
            }
            prefix.push_str(part);
            match arrays.get(&prefix) {
                Some(n) => header.push(format!("{part}[{}]", n - 1)),
                None => header.push(part.to_owned()),
            }
        }
    }
    // Keys of the enclosing inline tables on this line.
    let prefix = &src[line_start..start];
    let mut stack: Vec<Option<String>> = vec![None];
    let mut chars = prefix.char_indices().peekable();
    let mut token = String::new();
    while let Some((_, ch)) = chars.next() {
        match ch {
            '"' | '\'' => {
                let mut s = String::new();
                while let Some((_, c)) = chars.next() {
                    if c == '\\' && ch == '"' {
                        chars.next();
                        continue;
                    }
                    if c == ch {
                        break;
                    }
                    s.push(c);
                }
                token = format!("\"{s}\"");
            }
            '=' => {
                if let Some(top) = stack.last_mut() {
                    *top = Some(std::mem::take(&mut token));
                }
            }
            '{' => stack.push(None),
            '}' => {
                stack.pop();
                if stack.is_empty() {
                    stack.push(None);
                }
            }
            ',' => {
                if let Some(top) = stack.last_mut() {
                    *top = None;
                }
                token.clear();
            }
            c if c.is_alphanumeric() || c == '_' || c == '-' || c == '.' => token.push(c),
            _ => {
                if !token.is_empty() && !ch.is_whitespace() {
                    token.clear();
                }
            }
        }
    }
    let mut parts = header;
    parts.extend(
        stack
            .into_iter()
            .flatten()
            .map(|k| k.trim_matches('"').to_owned()),
    );
    // The span itself is a key when `=` follows it.
    let end = span.end.min(src.len()).max(start);
    if src[end..].trim_start().starts_with('=') {
        parts.push(src[start..end].trim().trim_matches('"').to_owned());
    }
    parts.join(".")
}
