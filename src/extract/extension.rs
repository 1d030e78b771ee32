//! Keys set by an upstream layer as a request extension: [`ExtensionKey`].

use std::any::type_name;
use std::fmt;
use std::marker::PhantomData;

use super::{DEFAULT_MAX_KEY_LEN, Key, KeyError, KeyExtractor, RequestView};

/// Uses a value of type `T` from the request extensions as the key.
///
/// This is for identities established upstream, typically by an
/// authentication layer that inserts the caller's id (`req.extensions_mut().insert(..)`)
/// before the request reaches the rate limiter. The key borrows the
/// extension's bytes.
///
/// `T` is any extension type that is `AsRef<[u8]>`, such as `String`,
/// `Vec<u8>`, `Box<[u8]>`, `&'static str` or `bytes::Bytes`. Types that only
/// implement `AsRef<str>`, such as `Arc<str>`, need a newtype that implements
/// `AsRef<[u8]>` (usually a good idea anyway, so that the extension type is
/// unique to the auth layer).
///
/// A request without the extension is rejected with [`KeyError::Missing`], an
/// empty value with [`KeyError::Empty`], and a value longer than
/// [`max_len`](Self::max_len) ([`DEFAULT_MAX_KEY_LEN`] by default) with
/// [`KeyError::TooLong`]. The value is otherwise trusted as is: any bytes are
/// accepted, since only server code can set an extension.
///
/// ```
/// use tollgate::extract::{ExtensionKey, KeyExtractor, RequestView};
///
/// /// The account an upstream auth layer authenticated the request as.
/// #[derive(Clone)]
/// struct AccountId(String);
///
/// impl AsRef<[u8]> for AccountId {
///     fn as_ref(&self) -> &[u8] {
///         self.0.as_bytes()
///     }
/// }
///
/// let extractor = ExtensionKey::<AccountId>::new();
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(AccountId("acct-42".to_owned()));
/// let key = extractor.extract(&RequestView::new(&req)).unwrap();
/// assert_eq!(key.as_bytes(), b"acct-42");
/// ```
pub struct ExtensionKey<T> {
    max_len: usize,
    // `fn() -> T`: the extractor holds no `T`, so it is `Send + Sync` for any `T`.
    _marker: PhantomData<fn() -> T>,
}

impl<T> ExtensionKey<T> {
    /// Reads the extension of type `T`, accepting values of at most
    /// [`DEFAULT_MAX_KEY_LEN`] bytes.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            max_len: DEFAULT_MAX_KEY_LEN,
            _marker: PhantomData,
        }
    }

    /// Sets the longest accepted value, in bytes; longer values are rejected
    /// with [`KeyError::TooLong`].
    #[must_use]
    pub const fn max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len;
        self
    }
}

impl<T> Default for ExtensionKey<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for ExtensionKey<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for ExtensionKey<T> {}

impl<T> fmt::Debug for ExtensionKey<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExtensionKey")
            .field("type", &type_name::<T>())
            .field("max_len", &self.max_len)
            .finish()
    }
}

impl<T> KeyExtractor for ExtensionKey<T>
where
    T: AsRef<[u8]> + Send + Sync + 'static,
{
    fn extract<'r>(&self, req: &RequestView<'r>) -> Result<Key<'r>, KeyError> {
        let bytes = req.extensions.get::<T>().ok_or(KeyError::Missing)?.as_ref();
        if bytes.is_empty() {
            return Err(KeyError::Empty);
        }
        if bytes.len() > self.max_len {
            return Err(KeyError::TooLong);
        }
        Ok(Key::borrowed(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extract<T: AsRef<[u8]> + Clone + Send + Sync + 'static>(
        extractor: &ExtensionKey<T>,
        value: Option<T>,
    ) -> Result<Vec<u8>, KeyError> {
        let mut req = http::Request::new(());
        if let Some(value) = value {
            req.extensions_mut().insert(value);
        }
        extractor
            .extract(&RequestView::new(&req))
            .map(|key| key.as_bytes().to_vec())
    }

    #[test]
    fn string_extension() {
        let e = ExtensionKey::<String>::new();
        assert_eq!(
            extract(&e, Some("user-1".to_owned())),
            Ok(b"user-1".to_vec())
        );
        assert_eq!(extract(&e, None), Err(KeyError::Missing));
        assert_eq!(extract(&e, Some(String::new())), Err(KeyError::Empty));
    }

    #[test]
    fn bytes_extension_accepts_any_bytes() {
        let e = ExtensionKey::<Vec<u8>>::default();
        let raw = vec![0, 0xff, b' ', b'\n'];
        assert_eq!(extract(&e, Some(raw.clone())), Ok(raw));
    }

    #[test]
    fn other_types_are_not_read() {
        let mut req = http::Request::new(());
        req.extensions_mut().insert(vec![1u8]);
        let key = ExtensionKey::<String>::new().extract(&RequestView::new(&req));
        assert_eq!(key, Err(KeyError::Missing));
    }

    #[test]
    fn max_len() {
        let e = ExtensionKey::<String>::new().max_len(3);
        assert_eq!(extract(&e, Some("abc".to_owned())), Ok(b"abc".to_vec()));
        assert_eq!(extract(&e, Some("abcd".to_owned())), Err(KeyError::TooLong));
        let long = "x".repeat(DEFAULT_MAX_KEY_LEN + 1);
        assert_eq!(
            extract(&ExtensionKey::<String>::new(), Some(long)),
            Err(KeyError::TooLong)
        );
    }

    #[test]
    fn key_borrows_the_extension() {
        let mut req = http::Request::new(());
        req.extensions_mut().insert("tenant-7".to_owned());
        let key = ExtensionKey::<String>::new()
            .extract(&RequestView::new(&req))
            .unwrap();
        let stored = req.extensions().get::<String>().unwrap();
        assert_eq!(key.as_bytes().as_ptr(), stored.as_ptr());
    }

    #[test]
    fn debug_and_clone_need_no_bounds_on_t() {
        // Neither `Debug` nor `Clone`.
        struct Opaque;
        impl AsRef<[u8]> for Opaque {
            fn as_ref(&self) -> &[u8] {
                b"opaque"
            }
        }
        let e = ExtensionKey::<Opaque>::new();
        let debug = format!("{e:?}");
        assert!(debug.contains("Opaque"), "{debug}");
        assert!(debug.contains("max_len: 256"), "{debug}");
        fn check<T: KeyExtractor + Clone + std::fmt::Debug>(_: &T) {}
        check(&e);
    }
}
