// placeholder until the extractors land
use super::*;
/// stub
#[derive(Debug, Clone, Default)]
pub struct ApiKeyHeader;
impl KeyExtractor for ApiKeyHeader {
    fn extract<'r>(&self, req: &RequestView<'r>) -> Result<Key<'r>, KeyError> {
        let v = req.headers.get("x-api-key").ok_or(KeyError::Missing)?;
        Ok(Key::borrowed(validate(v.as_bytes(), DEFAULT_MAX_KEY_LEN)?))
    }
}
/// stub
#[derive(Debug, Clone, Default)]
pub struct Bearer;
