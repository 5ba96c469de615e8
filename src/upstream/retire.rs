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

/// How long a retired backend with work in flight may run on before it is
/// sent another cancel request.
const CANCEL_AGAIN_AFTER: Duration = Duration::from_millis(500);

/// Ends a session's backend for good. Statements still running are
/// cancelled first: left alone they would run on, and commit, after their
/// session ended (its token expired, its client left), holding a Postgres
/// backend that no slot of the proxy counts. Then Terminate, and a wait
/// until the backend has closed the connection, so that the session's
/// slots are released only once its backend is gone.
///
/// A cancel request ends only the statement running when it arrives; one
/// the client pipelined behind it (or sent twice) would then run to its
/// end before the backend reads the Terminate. So while work is in flight
/// and the backend is still there, it is cancelled again every
/// [`CANCEL_AGAIN_AFTER`]. A cancel that reaches an idle backend is ignored
/// by Postgres.
pub(crate) async fn retire(
    mut stream: UpstreamStream,
    (host, port, key): (&str, u16, CancelKey),
    in_flight: bool,
    tls: &UpstreamTls,
) {
    let cancel = || async {
        if let Err(e) = crate::session::cancel::cancel_backend(host, port, key, tls).await {
            tracing::warn!(
                target: LOG_TARGET,
                error = %e, "cannot cancel the statement of a session that ended",
            );
        }
    };
    if in_flight {
        cancel().await;
    }
    let ended = tokio::time::timeout(RETIRE_TIMEOUT, async {
        let mut terminate = BytesMut::new();
        messages::terminate(&mut terminate);
        if stream.write_all(&terminate).await.is_ok() {
            let _ = stream.flush().await;
        }
        let mut sink = [0u8; 1024];
        let mut closed =
            std::pin::pin!(async { while let Ok(1..) = stream.read(&mut sink).await {} });
        while tokio::time::timeout(CANCEL_AGAIN_AFTER, closed.as_mut())
            .await
            .is_err()
        {
            if in_flight {
                cancel().await;
            }
        }
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
