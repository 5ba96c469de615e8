//! Everything a client can send before it is authenticated, fed through the
//! same parsing functions the front door uses: startup packets (SSLRequest,
//! GSSENCRequest, CancelRequest, StartupMessage of any version, with
//! `options`), then the password message. The input is the client's byte
//! stream; it is cut into packets the way the front door reads them.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rlsgate::protocol::refusal::Refusal;
use rlsgate::protocol::startup::{
    MAX_STARTUP_PACKET, Request, parse_password, parse_request, password_body_length,
    startup_packet_body_length,
};
use rlsgate::upstream::options::forwarded_parameters;

/// The default `[listen] max_token_bytes`.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// The front door answers at most one SSLRequest and one GSSENCRequest
/// before a StartupMessage; a few more packets cover the refusals.
const MAX_PACKETS: usize = 4;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    for _ in 0..MAX_PACKETS {
        let Some((header, rest)) = input.split_first_chunk::<4>() else {
            return;
        };
        let len = match startup_packet_body_length(*header) {
            Ok(len) => len,
            Err(refusal) => return check_refusal(&refusal),
        };
        assert!(
            (4..=MAX_STARTUP_PACKET - 4).contains(&len),
            "a startup packet body of {len} bytes was accepted"
        );
        let Some((packet, rest)) = rest.split_at_checked(len) else {
            // The client stopped sending: the front door waits, then closes.
            return;
        };
        input = rest;
        match parse_request(packet) {
            Err(refusal) => return check_refusal(&refusal),
            Ok(Request::Ssl | Request::GssEnc) => continue,
            Ok(Request::Cancel(_) | Request::PeerCancel(_)) => return,
            Ok(Request::Startup(startup)) => {
                if let Some(negotiation) = startup.negotiation() {
                    assert_eq!(negotiation.first(), Some(&b'v'));
                }
                assert!(
                    !startup.parameters.keys().any(|k| k.starts_with("_pq_.")),
                    "a protocol option left in the parameters"
                );
                match forwarded_parameters(&startup.parameters) {
                    Ok(forwarded) => {
                        for (name, _) in &forwarded {
                            // PostgreSQL matches `user` and `database` exactly
                            // and settings in any case.
                            let setting = name.to_ascii_lowercase();
                            assert!(
                                !matches!(name.as_str(), "user" | "database")
                                    && !matches!(
                                        setting.as_str(),
                                        "role" | "session_authorization"
                                    )
                                    && !setting.starts_with("rlsgate."),
                                "{name} was forwarded upstream"
                            );
                        }
                    }
                    Err(refusal) => check_refusal(&refusal),
                }
                return password(input);
            }
        }
    }
});

/// The password message that follows a StartupMessage.
fn password(input: &[u8]) {
    let Some((header, rest)) = input.split_first_chunk::<5>() else {
        return;
    };
    let len = match password_body_length(*header, MAX_TOKEN_BYTES) {
        Ok(len) => len,
        Err(refusal) => return check_refusal(&refusal),
    };
    assert!(
        len <= MAX_TOKEN_BYTES + 1,
        "a {len}-byte password was accepted"
    );
    let Some(body) = rest.get(..len) else {
        return;
    };
    match parse_password(body.to_vec()) {
        Ok(password) => assert!(!password.contains('\0')),
        Err(refusal) => check_refusal(&refusal),
    }
}

/// A refusal must encode as an ErrorResponse with a five-character SQLSTATE.
fn check_refusal(refusal: &Refusal) {
    assert_eq!(refusal.sqlstate.len(), 5, "{refusal}");
    let mut out = BytesMut::new();
    refusal.encode(&mut out);
    assert_eq!(out.first(), Some(&b'E'));
}
