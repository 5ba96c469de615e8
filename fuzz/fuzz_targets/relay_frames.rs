//! The relay's message framing of the server-to-client stream, checked
//! against a plain walk over the whole stream, however the stream is cut
//! into reads and wherever an ending asks to stop at a boundary.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rlsgate::session::relay::Frames;

/// Where the messages of `stream` end: `Some(true)` when the stream ends at
/// a message boundary, `Some(false)` inside a message, `None` when a length
/// field is impossible (below 4, which counts itself).
fn reference(stream: &[u8]) -> Option<bool> {
    let mut at: u64 = 0;
    let end = stream.len() as u64;
    while at < end {
        if at + 5 > end {
            return Some(false);
        }
        let i = at as usize;
        let len = u32::from_be_bytes([stream[i + 1], stream[i + 2], stream[i + 3], stream[i + 4]]);
        if len < 4 {
            return None;
        }
        at += 1 + u64::from(len);
    }
    Some(at == end)
}

fuzz_target!(|data: &[u8]| {
    // The first bytes choose how the rest is cut into reads: each is a read
    // length; its high bit asks the framing to stop at the next boundary.
    let Some((&cuts_len, rest)) = data.split_first() else {
        return;
    };
    let cuts_len = usize::from(cuts_len % 16).min(rest.len());
    let (cuts, stream) = rest.split_at(cuts_len);

    let expected = reference(stream);
    let mut frames = Frames::default();
    let mut at = 0;
    let mut cut = 0;
    let mut broken = false;
    while at < stream.len() {
        let (len, stop) = match cuts.get(cut) {
            Some(&c) => (usize::from(c & 0x7f).max(1), c & 0x80 != 0),
            None => (stream.len() - at, false),
        };
        cut += 1;
        let chunk = &stream[at..(at + len).min(stream.len())];
        let Some(taken) = frames.consume(chunk, stop) else {
            broken = true;
            break;
        };
        assert!(
            taken <= chunk.len(),
            "took {taken} of {} bytes",
            chunk.len()
        );
        if taken < chunk.len() {
            assert!(stop, "cut short without being asked to stop");
            assert!(frames.at_boundary(), "stopped inside a message");
        }
        // What was not taken is read again, as if it had not arrived yet.
        at += taken;
    }
    match expected {
        None => assert!(broken, "an impossible length was not noticed"),
        Some(boundary) => {
            assert!(!broken, "a valid stream was called malformed");
            assert_eq!(frames.at_boundary(), boundary);
        }
    }
});
