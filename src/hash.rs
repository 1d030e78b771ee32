//! Keyed hashing of attacker-chosen keys.
//!
//! Keys (IP addresses, API keys) are chosen by clients, so they are hashed with
//! SipHash-1-3 under a random 128-bit key drawn once per process: a client
//! cannot predict where its keys land, so it cannot aim a flood of keys at one
//! neighbourhood of the store's table, nor find two keys that share a slot.

use std::hash::{BuildHasher, Hasher as _, RandomState};
use std::sync::OnceLock;

use siphasher::sip128::{Hasher128, SipHasher13};

/// A 128-bit keyed digest of a key's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Digest(pub(crate) u128);

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Digest(..)")
    }
}

fn seeds() -> (u64, u64) {
    static SEEDS: OnceLock<(u64, u64)> = OnceLock::new();
    *SEEDS.get_or_init(|| {
        // std's RandomState is seeded from the operating system's randomness.
        let s = RandomState::new();
        (s.hash_one(0x746f_6c6c_u64), s.hash_one(0x6761_7465_u64))
    })
}

/// The keyed digest of `bytes` (the same within one process).
#[inline]
pub(crate) fn digest(bytes: &[u8]) -> Digest {
    static HASHER: OnceLock<SipHasher13> = OnceLock::new();
    let h = HASHER
        .get_or_init(|| {
            let (k0, k1) = seeds();
            SipHasher13::new_with_keys(k0, k1)
        })
        .hash(bytes);
    Digest(u128::from(h.h1) << 64 | u128::from(h.h2))
}

/// The digest's bit that marks a registered subject's state (see
/// [`registered`]).
const REGISTERED: u128 = 1 << 127;

/// The digest of a registered subject's state, from its name (a key's id,
/// an account's name): [`digest`] with the top bit set, which
/// [`state_digest`] always clears. The memory store keeps the two kinds in
/// tables of their own by that bit, so that anonymous clients, which may
/// come in any number, never take the room of a registered key.
#[inline]
pub(crate) fn id_digest(name: &[u8]) -> Digest {
    Digest(digest(name).0 | REGISTERED)
}

/// Whether `d` is the state of a registered subject ([`id_digest`]), not
/// of an anonymous one ([`state_digest`]).
#[inline(always)]
pub(crate) fn registered(d: Digest) -> bool {
    d.0 & REGISTERED != 0
}

/// The keyed digest of a key that only places state (a per-key or client-IP
/// key), from one 64-bit SipHash-1-3: half the work of [`digest`]. Two keys
/// share state only if their 64-bit hashes collide (about 1 in 2^64 per pair,
/// and not findable without the process's random key), and then they share
/// one bucket: each gets less, never more. Registered API key values, which
/// authenticate, use the full 128-bit [`digest`].
///
/// The bytes are hashed as one message (SipHash's own length byte ends it),
/// not through `Hash for [u8]`, which would add a length block and the
/// `Hasher` trait's buffering: a third of the work for an 8-byte key.
///
/// The high half is the hash times an odd constant, its top bit cleared
/// (the low half is the whole hash, so the digest is exactly as unique as
/// the hash; the cleared bit marks it anonymous, see [`registered`]):
/// state is placed by the low half alone, and one multiply beside the hash
/// costs less than a finaliser's two on every decision.
#[inline]
pub(crate) fn state_digest(bytes: &[u8]) -> Digest {
    static STATE: OnceLock<siphasher::sip::SipHasher13> = OnceLock::new();
    let h = STATE
        .get_or_init(|| {
            let (k0, k1) = seeds();
            // Another key than `digest`'s, so the two never coincide.
            siphasher::sip::SipHasher13::new_with_keys(mix(k0 ^ 0x0053_5441_5445), mix(k1))
        })
        .hash(bytes);
    let high = (h ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(0xff51_afd7_ed55_8ccd);
    Digest((u128::from(high) << 64 | u128::from(h)) & !REGISTERED)
}

/// A hash that is the same in every process (SipHash-1-3 under a fixed key),
/// for names shared between instances: a limit's id, and, in a shared store,
/// the name of a subject's state. Never used to place state in this
/// process's tables, where clients could aim at it.
pub(crate) fn stable(bytes: &[u8]) -> u128 {
    keyed(0x746f_6c6c_6761_7465, 0x7374_6162_6c65_0001, bytes)
}

/// SipHash-1-3 (128 bits) of `bytes` under the key `(k0, k1)`.
pub(crate) fn keyed(k0: u64, k1: u64, bytes: &[u8]) -> u128 {
    let mut h = SipHasher13::new_with_keys(k0, k1);
    h.write(bytes);
    let h = h.finish128();
    u128::from(h.h1) << 64 | u128::from(h.h2)
}

/// Hashes a [`Digest`] for a `HashMap` by taking 64 of its bits: the digest is
/// already a keyed hash, so hashing it again would only cost time.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only digests are hashed with this hasher; fold anything else anyway.
        for &b in bytes {
            self.0 = mix(self.0 ^ u64::from(b));
        }
    }

    fn write_u128(&mut self, n: u128) {
        self.0 ^= n as u64;
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

/// The `BuildHasher` of maps keyed by [`Digest`].
pub(crate) type BuildDigestHasher = std::hash::BuildHasherDefault<DigestHasher>;

/// The 64-bit finaliser of MurmurHash3: a bijection that spreads every input bit.
#[inline]
pub(crate) const fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_stable_and_distinguishes() {
        assert_eq!(digest(b"abc"), digest(b"abc"));
        assert_ne!(digest(b"abc"), digest(b"abd"));
        assert_ne!(digest(b""), digest(b"\0"));
        assert_eq!(format!("{:?}", digest(b"secret")), "Digest(..)");
        let d = digest(b"k");
        assert_eq!(BuildDigestHasher::default().hash_one(d), d.0 as u64);
    }

    #[test]
    fn registered_and_anonymous_state_are_told_apart() {
        for i in 0..1_000u32 {
            let name = i.to_le_bytes();
            assert!(registered(id_digest(&name)));
            assert!(!registered(state_digest(&name)));
            assert_eq!(id_digest(&name).0 as u64, digest(&name).0 as u64);
        }
    }
}
