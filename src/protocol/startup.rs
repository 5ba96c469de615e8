//! The packets a client sends before it is authenticated, parsed: pure
//! functions over bytes, with no I/O, so that they can be fuzzed alone
//! (`fuzz/`). The front door (`session::front_door`) reads them.

use std::collections::BTreeMap;

use bytes::{BufMut, BytesMut};
use pgwire::messages::startup::Startup;
use pgwire::messages::{DecodeContext, Message};

use crate::protocol::frame::{self, HEADER_LEN, Header};
use crate::protocol::messages;
use crate::protocol::refusal::{Reason, Refusal, sqlstate};

/// Largest packet before authentication, as in PostgreSQL's `pqcomm.h`.
pub const MAX_STARTUP_PACKET: usize = 10_000;
/// The request codes of the packets that are not a StartupMessage.
pub(crate) const SSL_REQUEST: u32 = 80_877_103;
pub(crate) const GSSENC_REQUEST: u32 = 80_877_104;
pub(crate) const CANCEL_REQUEST: u32 = 80_877_102;
/// A CancelRequest one rlsgate replica forwards to the peer whose key it
/// names (`1234 << 16 | 7777`, a code PostgreSQL does not use): handled
/// there, never forwarded again.
pub const PEER_CANCEL_REQUEST: u32 = 80_879_201;
/// The protocol version the proxy speaks (major in the high 16 bits).
pub(crate) const PROTOCOL_3_0: u32 = 196_608;

/// The key of a CancelRequest: a backend's process id and secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub(crate) pid: i32,
    pub(crate) secret: i32,
}

/// One packet a client may send before it is authenticated, parsed.
#[derive(Debug)]
pub enum Request {
    /// SSLRequest: the client asks for TLS.
    Ssl,
    /// GSSENCRequest: the client asks for GSSAPI encryption.
    GssEnc,
    /// CancelRequest for the backend with this key.
    Cancel(CancelKey),
    /// A CancelRequest forwarded by a peer replica.
    PeerCancel(CancelKey),
    /// StartupMessage of protocol 3.x.
    Startup(StartupMessage),
}

/// A StartupMessage: the protocol version asked for and the parameters.
#[derive(Debug)]
pub struct StartupMessage {
    /// The version the client asked for (major in the high 16 bits).
    pub version: u32,
    /// The parameters, without the `_pq_.` protocol options.
    pub parameters: BTreeMap<String, String>,
    /// The `_pq_.` protocol options the client asked for; none is supported.
    pub unsupported_options: Vec<String>,
}

impl StartupMessage {
    /// The NegotiateProtocolVersion message the client must get before the
    /// authentication request, if it asked for a newer minor version or for
    /// protocol options, as PostgreSQL answers: we speak 3.0 and no options.
    pub fn negotiation(&self) -> Option<BytesMut> {
        if self.version == PROTOCOL_3_0 && self.unsupported_options.is_empty() {
            return None;
        }
        let mut out = BytesMut::new();
        messages::negotiate_protocol_version(
            &mut out,
            PROTOCOL_3_0,
            self.unsupported_options.clone(),
        );
        Some(out)
    }
}

/// The length of the packet that follows a startup packet's 4-byte length
/// field, or a refusal when the declared length is out of bounds: checked
/// before anything is read, so that a client cannot make us allocate more
/// than PostgreSQL's 10 000-byte limit.
pub fn startup_packet_body_length(header: [u8; 4]) -> Result<usize, Refusal> {
    let len = u32::from_be_bytes(header) as usize;
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(Refusal::protocol(format!(
            "invalid length of startup packet: {len}"
        )));
    }
    Ok(len - 4)
}

/// Parses a startup packet's body (everything after the length field): the
/// request code, then what that request carries.
pub fn parse_request(packet: &[u8]) -> Result<Request, Refusal> {
    let Some((code, body)) = packet.split_first_chunk::<4>() else {
        return Err(Refusal::protocol("invalid length of startup packet"));
    };
    let code = u32::from_be_bytes(*code);
    match code {
        SSL_REQUEST => Ok(Request::Ssl),
        GSSENC_REQUEST => Ok(Request::GssEnc),
        CANCEL_REQUEST if body.len() == 8 => Ok(Request::Cancel(cancel_key(body))),
        PEER_CANCEL_REQUEST if body.len() == 8 => Ok(Request::PeerCancel(cancel_key(body))),
        code if code >> 16 == 3 => parse_startup(code, body).map(Request::Startup),
        code => Err(unsupported_protocol(code)),
    }
}

fn cancel_key(body: &[u8]) -> CancelKey {
    CancelKey {
        pid: i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
        secret: i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
    }
}

/// Parses a StartupMessage's parameters, `body` being what follows the
/// version.
fn parse_startup(version: u32, body: &[u8]) -> Result<StartupMessage, Refusal> {
    if body.last() != Some(&0) {
        return Err(Refusal::protocol(
            "invalid startup packet layout: expected terminator as last byte",
        ));
    }
    // pgwire decodes from the full packet: put back the length and version.
    let mut full = BytesMut::with_capacity(body.len() + 8);
    full.put_u32((body.len() + 8) as u32);
    full.put_u32(version);
    full.put_slice(body);
    let parameters = match Startup::decode(&mut full, &DecodeContext::default()) {
        Ok(Some(startup)) => startup.parameters,
        _ => return Err(Refusal::protocol("invalid startup packet")),
    };
    let (unsupported_options, parameters): (BTreeMap<_, _>, BTreeMap<_, _>) = parameters
        .into_iter()
        .partition(|(k, _)| k.starts_with("_pq_."));
    Ok(StartupMessage {
        version,
        parameters,
        unsupported_options: unsupported_options.into_keys().collect(),
    })
}

/// The refusal of a request code the proxy does not speak, worded as
/// PostgreSQL words it.
pub(crate) fn unsupported_protocol(code: u32) -> Refusal {
    Refusal::new(
        sqlstate::FEATURE_NOT_SUPPORTED,
        format!(
            "unsupported frontend protocol {}.{}: rlsgate speaks protocol 3.0",
            code >> 16,
            code & 0xffff
        ),
    )
    .because(Reason::Malformed)
}

/// The length of a password message's body from its 5-byte header (type and
/// length), or a refusal when it is not a password message or is longer than
/// `max_bytes` allows: checked before the body is read.
pub fn password_body_length(header: [u8; HEADER_LEN], max_bytes: usize) -> Result<usize, Refusal> {
    let kind = header[0];
    if kind != frame::kind::PASSWORD {
        return Err(Refusal::protocol(format!(
            "expected a password message, got message type {:?}",
            kind as char
        )));
    }
    // At least the password's terminating NUL.
    let Some(Header { body_len, .. }) = Header::parse(header).filter(|h| h.body_len > 0) else {
        return Err(Refusal::protocol("invalid password message length"));
    };
    if body_len - 1 > max_bytes {
        return Err(Refusal::auth(format!(
            "the password is {} bytes, more than the {max_bytes}-byte token limit",
            body_len - 1
        ))
        .because(Reason::Malformed));
    }
    Ok(body_len)
}

/// The password from a password message's body: one NUL-terminated UTF-8
/// string, nothing after it.
pub fn parse_password(mut body: Vec<u8>) -> Result<String, Refusal> {
    if body.pop() != Some(0) || body.contains(&0) {
        return Err(Refusal::protocol("invalid password message"));
    }
    String::from_utf8(body).map_err(|_| {
        Refusal::auth("the password is not valid UTF-8, so it cannot be a token")
            .because(Reason::Malformed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, body: &[u8]) -> Vec<u8> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(body);
        p
    }

    #[test]
    fn a_declared_length_out_of_bounds_is_refused_before_reading() {
        for len in [0u32, 7, 10_001, 1 << 30, u32::MAX] {
            let refusal = startup_packet_body_length(len.to_be_bytes()).unwrap_err();
            assert_eq!(refusal.sqlstate, sqlstate::PROTOCOL_VIOLATION, "{len}");
        }
        assert_eq!(startup_packet_body_length(8u32.to_be_bytes()).unwrap(), 4);
        assert_eq!(
            startup_packet_body_length(10_000u32.to_be_bytes()).unwrap(),
            9_996
        );
    }

    #[test]
    fn requests_are_told_apart_by_their_code() {
        assert!(matches!(
            parse_request(&packet(SSL_REQUEST, b"")),
            Ok(Request::Ssl)
        ));
        assert!(matches!(
            parse_request(&packet(GSSENC_REQUEST, b"")),
            Ok(Request::GssEnc)
        ));
        let key = [0, 0, 0, 7, 0xff, 0xff, 0xff, 0xfe];
        match parse_request(&packet(PEER_CANCEL_REQUEST, &key)) {
            Ok(Request::PeerCancel(key)) => assert_eq!(key, CancelKey { pid: 7, secret: -2 }),
            other => panic!("{other:?}"),
        }
        match parse_request(&packet(CANCEL_REQUEST, &key)) {
            Ok(Request::Cancel(key)) => assert_eq!(key, CancelKey { pid: 7, secret: -2 }),
            other => panic!("{other:?}"),
        }
        // A cancel request of the wrong size is no cancel request.
        let refusal = parse_request(&packet(CANCEL_REQUEST, &key[..7])).unwrap_err();
        assert!(refusal.message.contains("1234.5678"), "{refusal}");
        let refusal = parse_request(&packet(2 << 16, b"\0")).unwrap_err();
        assert_eq!(refusal.sqlstate, sqlstate::FEATURE_NOT_SUPPORTED);
        assert!(parse_request(b"\0\0\0").is_err());
    }

    #[test]
    fn a_startup_message_splits_off_protocol_options_and_negotiates() {
        let body = b"user\0alice\0_pq_.x\0y\0\0";
        let Ok(Request::Startup(startup)) = parse_request(&packet(PROTOCOL_3_0, body)) else {
            panic!("a startup message");
        };
        assert_eq!(startup.parameters.len(), 1);
        assert_eq!(startup.parameters["user"], "alice");
        assert_eq!(startup.unsupported_options, ["_pq_.x"]);
        assert_eq!(startup.negotiation().unwrap()[0], b'v');

        let Ok(Request::Startup(plain)) = parse_request(&packet(PROTOCOL_3_0, b"user\0a\0\0"))
        else {
            panic!("a startup message");
        };
        assert!(plain.negotiation().is_none());
        let Ok(Request::Startup(newer)) = parse_request(&packet(PROTOCOL_3_0 + 2, b"\0")) else {
            panic!("a startup message");
        };
        assert!(newer.negotiation().is_some());
    }

    #[test]
    fn malformed_startup_messages_are_refused() {
        for body in [&b""[..], b"user\0alice", b"user"] {
            let refusal = parse_request(&packet(PROTOCOL_3_0, body)).unwrap_err();
            assert_eq!(refusal.sqlstate, sqlstate::PROTOCOL_VIOLATION, "{body:?}");
        }
    }

    #[test]
    fn password_lengths_are_checked_before_the_body_is_read() {
        let header = |kind: u8, len: u32| {
            let [a, b, c, d] = len.to_be_bytes();
            [kind, a, b, c, d]
        };
        assert_eq!(password_body_length(header(b'p', 10), 100).unwrap(), 6);
        assert!(password_body_length(header(b'Q', 10), 100).is_err());
        assert!(password_body_length(header(b'p', 4), 100).is_err());
        let refusal = password_body_length(header(b'p', 1 << 30), 100).unwrap_err();
        assert_eq!(refusal.sqlstate, sqlstate::INVALID_AUTHORIZATION);
        assert!(password_body_length(header(b'p', u32::MAX), usize::MAX - 1).is_ok());
    }

    #[test]
    fn a_password_is_one_terminated_utf8_string() {
        assert_eq!(parse_password(b"eyJ\0".to_vec()).unwrap(), "eyJ");
        for body in [&b""[..], b"eyJ", b"ey\0J\0", b"\xff\0"] {
            assert!(parse_password(body.to_vec()).is_err(), "{body:?}");
        }
    }
}
