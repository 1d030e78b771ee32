//! The registry's text formats: a key's record as Redis holds it, and a
//! change as the log carries it.
//!
//! A string is written `<byte length>:<bytes>`, so names may hold any
//! character. A record is `<32 hex digits of the value hash><0 or 1,
//! enabled><plan>[<account>]`; its value hash comes first, at a fixed place,
//! so the write script reads it without parsing (an update, which sets some
//! fields of the stored record, parses the rest there). A logged change is
//! one letter and its strings: `A` id record, `I` (id record)…, `U` id
//! record (as the update left it in Redis), `D` id, `P` name text, `C` name
//! text, or `R` alone (too large to log: read everything again). The script
//! writes the logged form; this module reads it.

use std::fmt::Write as _;

use super::{Change, KeyRecord};

/// Appends `s` as `<len>:<s>`.
pub(super) fn field(out: &mut String, s: &str) {
    let _ = write!(out, "{}:{s}", s.len());
}

/// A key's record as the keys hash holds it (its id is the field's name).
pub(super) fn record(key: &KeyRecord) -> String {
    let mut out = format!("{:032x}{}", key.value_hash, u8::from(key.enabled));
    field(&mut out, &key.plan);
    out.push_str(&account(key.account.as_deref()));
    out
}

/// A record's account part, as it ends the record: nothing without an
/// account (an update sends it in this form, so that "none" and an account
/// named "" differ).
pub(super) fn account(account: Option<&str>) -> String {
    let mut out = String::new();
    if let Some(account) = account {
        field(&mut out, account);
    }
    out
}

/// The record of key `id` from its stored text.
pub(super) fn parse_record(id: &str, text: &str) -> Option<KeyRecord> {
    let value_hash = u128::from_str_radix(text.get(..32)?, 16).ok()?;
    let enabled = match text.get(32..33)? {
        "1" => true,
        "0" => false,
        _ => return None,
    };
    let mut r = Reader(text.get(33..)?);
    let plan = r.field()?.to_owned();
    let account = if r.0.is_empty() {
        None
    } else {
        Some(r.field()?.to_owned())
    };
    r.0.is_empty().then(|| KeyRecord {
        id: id.to_owned(),
        value_hash,
        plan,
        account,
        enabled,
    })
}

/// What one log entry says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Logged {
    Change(Change),
    /// The change was too large to log: read the whole registry.
    Reload,
}

/// The change a log entry carries, as the script wrote it.
pub(super) fn parse_change(text: &str) -> Option<Logged> {
    let (op, rest) = (text.get(..1)?, text.get(1..)?);
    let mut r = Reader(rest);
    let change = match op {
        "R" if rest.is_empty() => return Some(Logged::Reload),
        "A" => Change::AddKey(r.key()?),
        "U" => Change::UpdateKey(r.key()?),
        "I" => {
            let mut keys = Vec::new();
            while !r.0.is_empty() {
                keys.push(r.key()?);
            }
            Change::Import(keys)
        }
        "D" => Change::RemoveKey {
            id: r.field()?.to_owned(),
        },
        "P" => Change::PutPlan {
            name: r.field()?.to_owned(),
            encoded: r.field()?.to_owned(),
        },
        "C" => Change::PutAccount {
            name: r.field()?.to_owned(),
            encoded: r.field()?.to_owned(),
        },
        _ => return None,
    };
    r.0.is_empty().then_some(Logged::Change(change))
}

/// Reads `<len>:<bytes>` strings one after another.
struct Reader<'a>(&'a str);

impl<'a> Reader<'a> {
    fn field(&mut self) -> Option<&'a str> {
        let (len, rest) = self.0.split_once(':')?;
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let len: usize = len.parse().ok()?;
        let s = rest.get(..len)?;
        self.0 = &rest[len..];
        Some(s)
    }

    fn key(&mut self) -> Option<KeyRecord> {
        let id = self.field()?;
        parse_record(id, self.field()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, account: Option<&str>) -> KeyRecord {
        KeyRecord {
            id: id.to_owned(),
            value_hash: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            plan: "gold:1 ÷".to_owned(),
            account: account.map(str::to_owned),
            enabled: account.is_none(),
        }
    }

    /// The logged form of an add, as the script builds it.
    fn logged(op: &str, keys: &[KeyRecord]) -> String {
        let mut out = op.to_owned();
        for k in keys {
            field(&mut out, &k.id);
            field(&mut out, &record(k));
        }
        out
    }

    #[test]
    fn records_round_trip() {
        for k in [
            key("k1", None),
            key("a:b:9", Some("acme:7")),
            key("", Some("")),
        ] {
            assert_eq!(parse_record(&k.id, &record(&k)), Some(k.clone()));
        }
        assert!(record(&key("k", None)).starts_with("0123456789abcdef00112233445566771"));
    }

    #[test]
    fn changes_round_trip() {
        let (a, b) = (key("k1", None), key("k2", Some("acme")));
        let add = parse_change(&logged("A", std::slice::from_ref(&a)));
        assert_eq!(add, Some(Logged::Change(Change::AddKey(a.clone()))));
        let import = parse_change(&logged("I", &[a.clone(), b.clone()]));
        assert_eq!(import, Some(Logged::Change(Change::Import(vec![a, b]))));
        assert_eq!(
            parse_change("I"),
            Some(Logged::Change(Change::Import(vec![])))
        );
        assert_eq!(
            parse_change("D2:k1"),
            Some(Logged::Change(Change::RemoveKey { id: "k1".into() }))
        );
        assert_eq!(
            parse_change("P4:gold3:x:y"),
            Some(Logged::Change(Change::PutPlan {
                name: "gold".into(),
                encoded: "x:y".into()
            }))
        );
        assert_eq!(parse_change("R"), Some(Logged::Reload));
    }

    #[test]
    fn malformed_text_is_refused() {
        for bad in [
            "", "X", "R1:a", "D", "D3:ab", "D2:abc", "D+1:a", "P1:a", "A2:k1",
        ] {
            assert_eq!(parse_change(bad), None, "{bad:?}");
        }
        assert_eq!(parse_record("k", "00"), None);
        let good = record(&key("k", None));
        assert_eq!(
            parse_record("k", &format!("{}2{}", &good[..32], &good[33..])),
            None
        );
        assert_eq!(parse_record("k", &format!("{good}x")), None);
    }
}
