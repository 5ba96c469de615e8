//! One client connection, from accept to close.

pub mod cancel;
pub mod connection;
pub mod front_door;
pub mod limit;
pub mod listener;
pub mod net;
pub mod relay;
pub mod shutdown;
pub mod stream;
pub mod tls;
