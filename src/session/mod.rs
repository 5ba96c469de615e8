//! One client connection, from accept to close.

pub mod cancel;
pub(crate) mod connection;
pub(crate) mod front_door;
pub(crate) mod limit;
pub mod listener;
pub(crate) mod net;
pub mod relay;
pub(crate) mod shutdown;
pub(crate) mod stream;
pub(crate) mod tls;
pub(crate) mod transaction;
#[cfg(target_os = "linux")]
pub(crate) mod uring;
pub(crate) mod workers;
