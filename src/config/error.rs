//! `ConfigFileError`: where a configuration file is wrong, and why.
//!
//! It names the file (when read from one), the line and column, the field's
//! path and the message.

use std::fmt;

/// A configuration file that cannot be used: where, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFileError {
    pub(super) file: Option<String>,
    pub(super) line: usize,
    pub(super) column: usize,
    pub(super) path: String,
    pub(super) message: String,
}

impl ConfigFileError {
    /// The line of the offending field, from 1 (0 when the file could not be read).
    pub fn line(&self) -> usize {
        self.line
    }

    /// The column, from 1.
    pub fn column(&self) -> usize {
        self.column
    }

    /// The field's path, such as `plans[0].throttle.rate` (empty when unknown).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What is wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), 0) => write!(f, "{file}: ")?,
            (Some(file), line) => write!(f, "{file}:{line}:{}: ", self.column)?,
            (None, 0) => {}
            (None, line) => write!(f, "{line}:{}: ", self.column)?,
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", Printable(&self.path))?;
        }
        write!(f, "{}", Printable(&self.message))
    }
}

/// Text from the file as a terminal may be given it: a control character
/// (which a TOML string may hold escaped, and a file that is no TOML raw)
/// is written as its escape, `\u{1b}`.
struct Printable<'a>(&'a str);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in self.0.split_inclusive(char::is_control) {
            let mut chars = part.chars();
            match chars.next_back() {
                Some(c) if c.is_control() => write!(f, "{}{}", chars.as_str(), c.escape_unicode())?,
                _ => f.write_str(part)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigFileError {}
