//! Cancellation: clients hold keys the proxy made up; each maps to the
//! upstream backend's real key, which never leaves the proxy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::front_door::CancelKey;

struct Target {
    address: String,
    key: CancelKey,
}

#[derive(Default)]
pub struct CancelRegistry {
    targets: Mutex<HashMap<CancelKey, Target>>,
}

/// Keeps a session's key registered; dropping it unregisters the key.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pub key: CancelKey,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .targets
            .lock()
            .expect("cancel lock")
            .remove(&self.key);
    }
}

impl CancelRegistry {
    /// Issues a fresh random key for a session whose backend is `upstream`.
    pub fn register(self: &Arc<Self>, address: String, upstream: CancelKey) -> Registration {
        let mut targets = self.targets.lock().expect("cancel lock");
        let key = loop {
            let key = CancelKey {
                pid: rand::random::<i32>() & i32::MAX,
                secret: rand::random(),
            };
            if !targets.contains_key(&key) {
                break key;
            }
        };
        targets.insert(
            key,
            Target {
                address,
                key: upstream,
            },
        );
        Registration {
            registry: Arc::clone(self),
            key,
        }
    }

    /// Forwards a cancel request; an unknown key is ignored, as Postgres does.
    pub async fn cancel(&self, key: CancelKey) {
        let target = {
            let targets = self.targets.lock().expect("cancel lock");
            targets.get(&key).map(|t| (t.address.clone(), t.key))
        };
        let Some((address, upstream)) = target else {
            tracing::info!("cancel request with an unknown key ignored");
            return;
        };
        let mut packet = BytesMut::with_capacity(16);
        frontend::cancel_request(upstream.pid, upstream.secret, &mut packet);
        match TcpStream::connect(&address).await {
            Ok(mut stream) => {
                if let Err(e) = stream.write_all(&packet).await {
                    tracing::warn!(%address, error = %e, "cannot send cancel request upstream");
                }
            }
            Err(e) => tracing::warn!(%address, error = %e, "cannot connect upstream to cancel"),
        }
    }
}
