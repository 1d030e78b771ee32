// placeholder until the extractors land
/// stub
#[derive(Debug, Clone, Default)]
pub struct ClientIp;
impl ClientIp {
    /// stub
    pub fn new() -> Self {
        Self
    }
}
impl super::KeyExtractor for ClientIp {
    fn extract<'r>(
        &self,
        _req: &super::RequestView<'r>,
    ) -> Result<super::Key<'r>, super::KeyError> {
        Err(super::KeyError::MissingPeerAddr)
    }
}
