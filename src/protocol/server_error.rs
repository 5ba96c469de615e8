//! An ErrorResponse from Postgres, reduced to the fields the proxy acts on.

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{ErrorResponseBody, Message};

use crate::protocol::frame::Frame;

/// What an ErrorResponse says. Fields it lacks are empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ServerError {
    /// `V`, which is never translated, or else `S` (servers before 9.6).
    pub(crate) severity: String,
    /// `C`: the SQLSTATE.
    pub(crate) code: String,
    /// `M`: the primary message.
    pub(crate) message: String,
}

impl ServerError {
    /// Walks the fields; a malformed field ends the walk with what was read.
    pub(crate) fn from_body(body: &ErrorResponseBody) -> ServerError {
        let mut error = ServerError::default();
        let mut localized_severity = String::new();
        let mut fields = body.fields();
        while let Ok(Some(field)) = fields.next() {
            let value = || String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'V' => error.severity = value(),
                b'S' => localized_severity = value(),
                b'C' => error.code = value(),
                b'M' => error.message = value(),
                _ => {}
            }
        }
        if error.severity.is_empty() {
            error.severity = localized_severity;
        }
        error
    }

    /// The fields of an ErrorResponse frame; all empty when the frame is
    /// not one, or is malformed.
    pub(crate) fn from_frame(frame: Frame) -> ServerError {
        match frame.into_message() {
            Ok(Message::ErrorResponse(body)) => ServerError::from_body(&body),
            _ => ServerError::default(),
        }
    }

    /// Whether the error ends the connection: FATAL or PANIC, or a
    /// severity the server did not say.
    pub(crate) fn is_fatal(&self) -> bool {
        matches!(self.severity.as_str(), "FATAL" | "PANIC" | "")
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::protocol::messages;

    fn frame(severity: &str, code: &str, message: &str) -> Frame {
        let mut out = BytesMut::new();
        messages::error_response(&mut out, severity, code, message);
        Frame::from_raw(out)
    }

    #[test]
    fn the_fields_of_an_error_response_are_read() {
        let error = ServerError::from_frame(frame("ERROR", "42501", "permission denied"));
        assert_eq!(error.severity, "ERROR");
        assert_eq!(error.code, "42501");
        assert_eq!(error.message, "permission denied");
        assert!(!error.is_fatal());
        assert!(ServerError::from_frame(frame("FATAL", "57P01", "bye")).is_fatal());
    }

    /// An ErrorResponse with these fields, as a server writes it.
    fn error_with(fields: &[(u8, &str)]) -> Frame {
        let mut body = Vec::new();
        for (kind, value) in fields {
            body.push(*kind);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut out = BytesMut::from(&b"E"[..]);
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(&body);
        Frame::from_raw(out)
    }

    #[test]
    fn the_untranslated_severity_decides_and_the_translated_one_stands_in_for_old_servers() {
        // lc_messages = 'de_DE': S is translated, V is not.
        let german = error_with(&[(b'S', "FATAL-DE"), (b'V', "FATAL"), (b'C', "57P01")]);
        assert!(ServerError::from_frame(german).is_fatal());
        let german_error = error_with(&[(b'S', "FEHLER"), (b'V', "ERROR"), (b'C', "42501")]);
        let error = ServerError::from_frame(german_error);
        assert_eq!(error.severity, "ERROR");
        assert!(!error.is_fatal());
        // A server before 9.6 sends no V.
        let old = error_with(&[(b'S', "ERROR"), (b'C', "42501")]);
        assert!(!ServerError::from_frame(old).is_fatal());
    }

    #[test]
    fn what_is_not_an_error_response_has_no_fields_and_counts_as_fatal() {
        let mut out = BytesMut::new();
        messages::ready_for_query_idle(&mut out);
        let error = ServerError::from_frame(Frame::from_raw(out));
        assert_eq!(error, ServerError::default());
        assert!(error.is_fatal());
    }
}
