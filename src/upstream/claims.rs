//! Binding the claims envelope to a backend: `set_config` with bound
//! parameters (see [`messages::set_config`]), and reading its answer.

use std::io;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::auth::claims::{self, Identity, SigningKey};
use crate::protocol::frame::{Answer, MAX_BACKEND_MESSAGE};
use crate::protocol::messages;
use crate::protocol::refusal::Refusal;
use crate::protocol::server_error::ServerError;
use crate::session::stream::UpstreamStream;
use crate::upstream::login::UpstreamSession;

/// Why applying settings with [`messages::set_config`] failed.
pub(crate) enum SetFailure {
    /// The connection is gone (or going).
    Dead(String),
    /// The backend refused a setting; the connection is still usable.
    Refused(String),
}

/// Reads the answer to [`messages::set_config`] up to its ReadyForQuery,
/// passing each ParameterStatus on to `reported`. Returns the whole
/// messages the server sent unasked after it, read along (see [`Answer`]):
/// the client's, to be passed on ahead of anything else from the backend.
pub(crate) async fn read_set_config_answer(
    stream: &mut UpstreamStream,
    mut reported: impl FnMut(&[u8]),
) -> Result<BytesMut, SetFailure> {
    let dead = |e: io::Error| SetFailure::Dead(e.to_string());
    let mut refused = None;
    let mut answer = Answer::new(MAX_BACKEND_MESSAGE);
    loop {
        let frame = answer.next(stream).await.map_err(dead)?;
        match frame.kind() {
            b'1' | b'2' | b'3' | b'D' | b'C' | b'N' | b'A' => {}
            b'S' => reported(frame.body()),
            b'E' => {
                let error = ServerError::from_frame(frame);
                if error.is_fatal() {
                    return Err(SetFailure::Dead(
                        "the backend ended the connection".to_owned(),
                    ));
                }
                refused = Some(format!("{} {}", error.code, error.message));
            }
            b'Z' => {
                return match (refused, frame.body().first()) {
                    (Some(why), _) => Err(SetFailure::Refused(why)),
                    (None, Some(&b'I')) => answer.finish(stream).await.map_err(dead),
                    (None, _) => Err(SetFailure::Dead(
                        "not idle after applying settings".to_owned(),
                    )),
                };
            }
            other => {
                return Err(SetFailure::Dead(format!(
                    "unexpected message {:?} while applying settings",
                    other as char
                )));
            }
        }
    }
}

/// Binds `identity`'s envelope to an unpooled session's backend, in one
/// round trip. Returns the envelope's expiry.
pub(crate) async fn bind_claims(
    session: &mut UpstreamSession,
    key: &SigningKey,
    identity: &Identity,
    now: u64,
) -> Result<u64, Refusal> {
    let exp = identity.envelope_expiry(now);
    let sealed = key.seal(identity, session.backend, exp);
    let failed = |why: String| {
        Refusal::database_unavailable(format!("binding the session's claims failed: {why}"))
    };
    let mut out = BytesMut::new();
    messages::set_config(&mut out, "", [(claims::SETTING, sealed.as_str())])
        .map_err(|e| failed(e.to_string()))?;
    let stream = &mut session.stream;
    let written = async {
        stream.write_all(&out).await?;
        stream.flush().await
    };
    written.await.map_err(|e| failed(e.to_string()))?;
    let unasked = read_set_config_answer(&mut session.stream, |_| {})
        .await
        .map_err(|(SetFailure::Dead(why) | SetFailure::Refused(why))| failed(why))?;
    // After the ReadyForQuery the client is greeted with, where the relay
    // would have passed them on.
    session.ready.extend_from_slice(&unasked);
    Ok(exp)
}
