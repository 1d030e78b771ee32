// placeholder until the extractors land
/// stub
#[derive(Debug)]
pub struct ExtensionKey;
