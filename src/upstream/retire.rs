//! Ending a session's backend for good.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::protocol::messages;
use crate::protocol::startup::CancelKey;
use crate::session::stream::UpstreamStream;
use crate::upstream::tls::UpstreamTls;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::upstream=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::upstream";

/// How long a retired backend may take to end after its Terminate.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Ends a session's backend for good. A statement still running is
/// cancelled first: left alone it would run on, and commit, after its
/// session ended (its token expired, its client left), holding a Postgres
/// backend that no slot of the proxy counts. Then Terminate, and a wait
/// until the backend has closed the connection, so that the session's
/// slots are released only once its backend is gone.
pub(crate) async fn retire(
    mut stream: UpstreamStream,
    (host, port, key): (&str, u16, CancelKey),
    in_flight: bool,
    tls: &UpstreamTls,
) {
    if in_flight && let Err(e) = crate::session::cancel::cancel_backend(host, port, key, tls).await
    {
        tracing::warn!(
            target: LOG_TARGET,
            error = %e, "cannot cancel the statement of a session that ended",
        );
    }
    let ended = tokio::time::timeout(RETIRE_TIMEOUT, async {
        let mut terminate = BytesMut::new();
        messages::terminate(&mut terminate);
        if stream.write_all(&terminate).await.is_ok() {
            let _ = stream.flush().await;
        }
        let mut sink = [0u8; 1024];
        while let Ok(1..) = stream.read(&mut sink).await {}
    })
    .await;
    if ended.is_err() {
        tracing::warn!(
            target: LOG_TARGET,
            "the backend of an ended session is still running {RETIRE_TIMEOUT:?} after it was \
             told to end; its connection is closed and its slot freed"
        );
    }
}
