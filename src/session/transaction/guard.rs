//! What transaction pooling refuses: statements whose effect would outlive
//! the transaction (stub: refuses nothing yet).

/// A statement transaction pooling refuses.
pub(crate) struct Refused;

impl Refused {
    /// The ErrorResponse message.
    pub(crate) fn message(&self) -> String {
        String::new()
    }
}

/// What transaction pooling refuses in `sql`, if anything.
pub(crate) fn refused(_sql: &[u8]) -> Option<Refused> {
    None
}
