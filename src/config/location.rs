//! Where a span sits in a TOML document: line, column and field path.
//!
//! The path is dotted, as `plans[0].throttle.rate`, and is read from the text
//! itself, so that serde's own errors name a field too. Keys are written as
//! the document writes them: a quoted key keeps its quotes, as in
//! `plans[0].methods."/v1/x/POST".rate`, the form the checks name them in.

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

/// The dotted path of the field at `span`: the table the span is in, then
/// the keys of the inline tables and the indices of the arrays that enclose
/// it, then the key itself when the span is a key (an unknown field).
///
/// A span that starts at or in a table header is in that table: serde
/// reports a field missing from `[[keys]]` (or `[anonymous]`, or the first
/// `[[plans]]`) at the header of the table it is missing from, not in the
/// table above, and the parser a table defined twice at its name.
///
/// A path longer than a reader can use (a header of thousands of dotted
/// keys, arrays nested as deep as the parser allows) is shortened in its
/// middle.
pub(super) fn path_at(src: &str, span: Range<usize>) -> String {
    shortened(full_path_at(src, span))
}

/// `path`, its middle left out when it is longer than 2 × [`KEPT`] characters.
fn shortened(path: String) -> String {
    let n = path.chars().count();
    if n <= 2 * KEPT + 1 {
        return path;
    }
    let head: String = path.chars().take(KEPT).collect();
    let tail: String = path.chars().skip(n - KEPT).collect();
    format!("{head}…{tail}")
}

/// The characters kept at each end of a long path.
const KEPT: usize = 80;

fn full_path_at(src: &str, span: Range<usize>) -> String {
    let mut start = span.start.min(src.len());
    while !src.is_char_boundary(start) {
        start -= 1;
    }
    // A span inside a table header (a table defined twice is reported at
    // its name) is that table's.
    let line = src[..start].rfind('\n').map_or(0, |p| p + 1);
    if src[line..start].trim_start().starts_with('[') {
        let mut scan = Scan::default();
        scan.run(&src[..line]);
        if scan.at_line_start() {
            scan.header(src[line..].split('\n').next().unwrap_or_default());
            return scan.header.join(".");
        }
    }
    let mut scan = Scan::default();
    scan.run(&src[..start]);
    if scan.at_line_start() && src[start..].starts_with('[') {
        let header = src[start..].split('\n').next().unwrap_or_default();
        scan.header(header);
        return scan.header.join(".");
    }
    let mut parts = scan.path();
    // The span itself is a key when `=` follows it on its line (an unknown
    // field), or the first part of a dotted key when `.` does (a table
    // missing a field, as `throttle` in `throttle.rate = 1.0`).
    let end = span.end.min(src.len()).max(start);
    if src.is_char_boundary(end) {
        let after = src[end..].split('\n').next().unwrap_or_default();
        let after = after.trim_start();
        if after.starts_with('=') || (scan.in_key() && after.starts_with('.')) {
            parts.push(src[start..end].trim().to_owned());
        }
    }
    parts.join(".")
}

/// What encloses a value being read.
enum Frame {
    /// A table: the key whose value is being read, once its `=` is seen.
    Table(Option<Vec<String>>),
    /// An array: the index of the element being read.
    Array(usize),
}

/// A reading of a document's text, as far as a span: the table header it is
/// under, and the inline tables and arrays open at its end.
struct Scan {
    /// The current table's path, with the index of each array of tables.
    header: Vec<String>,
    /// How many tables of each array of tables (by dotted name) were opened.
    arrays: HashMap<String, usize>,
    /// The values open, outermost first: the first is the current table.
    frames: Vec<Frame>,
    /// The dotted key being read, before its `=`.
    key: Vec<String>,
    /// The bare key part being read.
    bare: String,
    /// Only whitespace since the last line break.
    line_start: bool,
}

impl Default for Scan {
    fn default() -> Self {
        Scan {
            header: Vec::new(),
            arrays: HashMap::new(),
            frames: vec![Frame::Table(None)],
            key: Vec::new(),
            bare: String::new(),
            line_start: true,
        }
    }
}

impl Scan {
    /// Whether a header may start here: at the start of a line, outside
    /// every inline table and array.
    fn at_line_start(&self) -> bool {
        self.line_start && self.frames.len() == 1
    }

    /// Whether the text being read is a key (no `=` seen yet in the
    /// innermost table).
    fn in_key(&self) -> bool {
        matches!(self.frames.last(), Some(Frame::Table(None)))
    }

    /// Ends the bare key part being read, if any.
    fn end_bare(&mut self) {
        if !self.bare.is_empty() {
            self.key.push(std::mem::take(&mut self.bare));
        }
    }

    fn run(&mut self, text: &str) {
        let mut chars = text.char_indices().peekable();
        while let Some((i, ch)) = chars.next() {
            if ch == '\n' {
                // A line break ends a key and value of the current table;
                // inside an inline array it is only whitespace.
                if self.frames.len() == 1 {
                    self.frames[0] = Frame::Table(None);
                    self.key.clear();
                    self.bare.clear();
                }
                self.line_start = true;
                continue;
            }
            if ch.is_whitespace() {
                if self.in_key() {
                    self.end_bare();
                }
                continue;
            }
            if ch == '[' && self.at_line_start() {
                let line = text[i..].split('\n').next().unwrap_or_default();
                self.header(line);
                // Past the header, to the end of its line.
                while chars.next_if(|&(_, c)| c != '\n').is_some() {}
                continue;
            }
            self.line_start = false;
            match ch {
                '#' => while chars.next_if(|&(_, c)| c != '\n').is_some() {},
                '"' | '\'' => {
                    let s = string(&text[i..]);
                    for _ in 1..s.chars().count() {
                        chars.next();
                    }
                    if self.in_key() {
                        self.key.push(s.to_owned());
                    }
                }
                '=' => {
                    self.end_bare();
                    let key = std::mem::take(&mut self.key);
                    if let Some(Frame::Table(k)) = self.frames.last_mut() {
                        *k = Some(key);
                    }
                }
                '.' if self.in_key() => self.end_bare(),
                '{' => self.frames.push(Frame::Table(None)),
                '[' => self.frames.push(Frame::Array(0)),
                '}' | ']' if self.frames.len() > 1 => {
                    self.frames.pop();
                }
                ',' => match self.frames.last_mut() {
                    Some(Frame::Array(n)) => *n += 1,
                    Some(Frame::Table(k)) => {
                        *k = None;
                        self.key.clear();
                        self.bare.clear();
                    }
                    None => {}
                },
                c if self.in_key() => self.bare.push(c),
                _ => {}
            }
        }
    }

    /// Reads a table header line, `[a.b]` or `[[a.b]]` (a comment may
    /// follow), and enters that table.
    fn header(&mut self, line: &str) {
        let t = line.trim_start();
        let (array, rest) = match t.strip_prefix("[[") {
            Some(rest) => (true, rest),
            None => (false, t.strip_prefix('[').unwrap_or(t)),
        };
        let mut names: Vec<String> = Vec::new();
        let mut bare = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, ch)) = chars.next() {
            match ch {
                ']' => break,
                '"' | '\'' => {
                    let s = string(&rest[i..]);
                    for _ in 1..s.chars().count() {
                        chars.next();
                    }
                    names.push(s.to_owned());
                }
                '.' => {
                    if !bare.is_empty() {
                        names.push(std::mem::take(&mut bare));
                    }
                }
                c if c.is_whitespace() => {}
                c => bare.push(c),
            }
        }
        if !bare.is_empty() {
            names.push(bare);
        }
        let full = names.join(".");
        if array {
            *self.arrays.entry(full).or_default() += 1;
        }
        self.header.clear();
        let mut prefix = String::new();
        for name in names {
            if !prefix.is_empty() {
                prefix.push('.');
            }
            prefix.push_str(&name);
            match self.arrays.get(&prefix) {
                Some(n) => self.header.push(format!("{name}[{}]", n - 1)),
                None => self.header.push(name),
            }
        }
        self.frames = vec![Frame::Table(None)];
        self.key.clear();
        self.bare.clear();
        self.line_start = false;
    }

    /// The path of what is being read: the table, then the keys and
    /// indices of the values open, then the dotted key read so far.
    fn path(&self) -> Vec<String> {
        let mut parts = self.header.clone();
        for frame in &self.frames {
            match frame {
                Frame::Table(Some(key)) => parts.extend(key.iter().cloned()),
                Frame::Table(None) => {}
                Frame::Array(i) => match parts.last_mut() {
                    Some(last) => last.push_str(&format!("[{i}]")),
                    None => parts.push(format!("[{i}]")),
                },
            }
        }
        if self.in_key() {
            parts.extend(self.key.iter().cloned());
            if !self.bare.is_empty() {
                parts.push(self.bare.clone());
            }
        }
        parts
    }
}

/// The string (with its quotes) that starts `text`: basic or literal, one
/// line or multi-line; to the end of its line (one-line) or of `text`
/// (multi-line) when it is not closed.
fn string(text: &str) -> &str {
    let bytes = text.as_bytes();
    let quote = bytes[0];
    let multi = bytes.len() >= 3 && bytes[1] == quote && bytes[2] == quote;
    let mut i = if multi { 3 } else { 1 };
    // Every place returned at is an ASCII byte, so a char boundary.
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quote == b'"' => i += 2,
            b'\n' if !multi => return &text[..i],
            b if b == quote && !multi => return &text[..=i],
            b if b == quote && bytes[i..].starts_with(&[quote; 3]) => {
                // Up to two quotes more belong to the string.
                let run = bytes[i..].iter().take_while(|&&q| q == quote).count();
                return &text[..i + run.min(5)];
            }
            _ => i += 1,
        }
    }
    text
}
