//! Transaction pooling: a backend per transaction, with the client's claims bound for that transaction only.

pub(crate) mod guard;
