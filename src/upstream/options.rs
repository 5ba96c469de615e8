//! The client's startup parameters that reach Postgres, and the splitting
//! of `options` exactly as PostgreSQL splits it.

use std::collections::BTreeMap;

use crate::protocol::refusal::{Refusal, sqlstate};

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::upstream=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::upstream";

/// Identity-bearing settings a client must not choose: its identity comes
/// only from the verified token.
fn is_identity_setting(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(name.as_str(), "role" | "session_authorization")
        || ["rlsgate.", "request.jwt.", "request.", "pg_session_jwt."]
            .iter()
            .any(|prefix| name.starts_with(prefix))
}

/// The client's startup parameters that may reach Postgres. `user`,
/// `database` and `replication` are the proxy's to set; settings that could
/// change identity are dropped, also from inside `options`.
pub fn forwarded_parameters(
    client: &BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, Refusal> {
    let mut forwarded = Vec::new();
    for (name, value) in client {
        match name.as_str() {
            "user" | "database" => {}
            "replication" => {
                return Err(Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "replication connections are not served by rlsgate",
                ));
            }
            "options" => {
                let options = filtered_options(value);
                if !options.is_empty() {
                    forwarded.push((name.clone(), options));
                }
            }
            name if is_identity_setting(name) => {
                tracing::info!(
                    target: LOG_TARGET,
                    parameter = %loggable(name),
                    "dropped identity-setting startup parameter"
                );
            }
            _ => forwarded.push((name.clone(), value.clone())),
        }
    }
    Ok(forwarded)
}

/// Keeps only `-c name=value` / `--name=value` settings that are not
/// identity settings; other backend switches have no business here.
///
/// The client's `options` are split as PostgreSQL's `pg_split_opts` splits
/// them (see [`split_option_bytes`]); what is kept is written out again so
/// that the server splits it into exactly the same settings.
///
/// A setting is kept only if every byte of it is printable ASCII (0x20 to
/// 0x7e). The server decides which bytes separate words with `isspace()`
/// under the database's `LC_CTYPE`: for bytes from 0x80 up that depends on
/// a locale the proxy cannot know, so a setting holding one could be split
/// by the server where the proxy saw none, and a backslash cannot make
/// every byte of a UTF-8 character literal without breaking the character.
/// Control bytes are dropped with them: no harmless setting needs one in
/// `options`. Such values can be sent as their own startup parameter (which
/// is never split) or `SET` after connecting. A dropped setting is logged
/// by its name only.
fn filtered_options(options: &str) -> String {
    let mut kept = Vec::new();
    let mut words = split_options(options).into_iter();
    while let Some(word) = words.next() {
        let setting = if word == "-c" {
            words.next()
        } else if let Some(rest) = word.strip_prefix("--") {
            Some(rest.to_owned())
        } else if let Some(rest) = word.strip_prefix("-c") {
            Some(rest.to_owned())
        } else {
            tracing::info!(target: LOG_TARGET, "dropped startup option that is not a setting");
            None
        };
        let Some(setting) = setting else { continue };
        // As PostgreSQL's ParseLongOption: the name ends at the first `=`,
        // and its dashes are underscores.
        let name = setting
            .split('=')
            .next()
            .unwrap_or_default()
            .replace('-', "_");
        if !setting.contains('=') {
            tracing::info!(
                target: LOG_TARGET,
                setting = %loggable(&name), "dropped startup option without a value",
            );
        } else if is_identity_setting(&name) {
            tracing::info!(
                target: LOG_TARGET,
                setting = %loggable(&name), "dropped identity-setting startup option",
            );
        } else if !setting.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            tracing::info!(
                target: LOG_TARGET,
                setting = %loggable(&name),
                "dropped startup option holding a control or non-ASCII byte: \
                 send it as a startup parameter of its own, or SET it after connecting"
            );
        } else {
            kept.push(format!("-c {}", escape_option(&setting)));
        }
    }
    kept.join(" ")
}

/// A client-chosen name as it may appear in a log line: bounded, with
/// control characters escaped.
fn loggable(name: &str) -> String {
    name.chars().take(64).flat_map(char::escape_debug).collect()
}

/// C's `isspace()` in the "C" locale: the bytes every locale treats as
/// space.
fn is_c_space(byte: u8) -> bool {
    matches!(byte, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ')
}

/// Splits exactly as PostgreSQL's `pg_split_opts` (postinit.c) does in the
/// "C" locale, byte by byte: leading space bytes are skipped, a word runs
/// to the next space byte that no backslash escapes, and a backslash makes
/// the next byte literal (a trailing one is dropped, leaving a word that
/// may be empty).
pub fn split_option_bytes(options: &[u8]) -> Vec<Vec<u8>> {
    let mut words = Vec::new();
    let mut bytes = options.iter().copied().peekable();
    loop {
        while bytes.next_if(|&b| is_c_space(b)).is_some() {}
        if bytes.peek().is_none() {
            return words;
        }
        let mut word = Vec::new();
        let mut escaped = false;
        while let Some(byte) = bytes.next_if(|&b| escaped || !is_c_space(b)) {
            if !escaped && byte == b'\\' {
                escaped = true;
            } else {
                escaped = false;
                word.push(byte);
            }
        }
        words.push(word);
    }
}

/// [`split_option_bytes`] of a string. Words end only at ASCII bytes and
/// lose only ASCII backslashes, so each is valid UTF-8 again.
pub(crate) fn split_options(options: &str) -> Vec<String> {
    split_option_bytes(options.as_bytes())
        .into_iter()
        .map(|word| String::from_utf8_lossy(&word).into_owned())
        .collect()
}

/// Escapes `word` so that `pg_split_opts` reads it back as one word:
/// a backslash before every backslash and every space byte.
fn escape_option(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    for c in word.chars() {
        if c == '\\' || u8::try_from(c).is_ok_and(is_c_space) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn identity_settings_are_dropped_and_harmless_ones_kept() {
        let forwarded = forwarded_parameters(&params(&[
            ("user", "authenticated"),
            ("database", "app"),
            ("application_name", "psql"),
            ("Role", "postgres"),
            ("rlsgate.session", "forged"),
            ("request.jwt.claims", "{}"),
            ("options", "-c role=postgres -c statement_timeout=5s --rlsgate.session=x -cTimeZone=UTC -c search_path=a\\ b -d 5"),
        ]))
        .unwrap();
        assert_eq!(
            forwarded,
            vec![
                ("application_name".to_owned(), "psql".to_owned()),
                (
                    "options".to_owned(),
                    "-c statement_timeout=5s -c TimeZone=UTC -c search_path=a\\ b".to_owned()
                ),
            ]
        );
    }

    /// The bytes C's `isspace()` accepts in every locale.
    const SPACE_BYTES: [u8; 6] = [b'\t', b'\n', 0x0b, 0x0c, b'\r', b' '];

    fn words(options: &[u8]) -> Vec<Vec<u8>> {
        split_option_bytes(options)
    }

    #[test]
    fn options_are_split_as_pg_split_opts_splits_them() {
        assert!(words(b"").is_empty());
        assert!(words(b" \t\x0b ").is_empty());
        assert_eq!(words(b"  -c  a=b \t\n"), [&b"-c"[..], b"a=b"]);
        assert_eq!(words(b"a\\ b\\\\c"), [&b"a b\\c"[..]]);
        assert_eq!(words(b"a\\\x0bb"), [&b"a\x0bb"[..]]);
        // A trailing backslash is dropped; alone it leaves an empty word.
        assert_eq!(words(b"x\\"), [&b"x"[..]]);
        assert_eq!(words(b"x \\"), [&b"x"[..], b""]);
        for space in SPACE_BYTES {
            assert_eq!(words(&[b'a', space, b'b']), [b"a", b"b"], "{space:#04x}");
        }
        // Above ASCII the server's splitting depends on its locale; the
        // filter drops settings holding such bytes instead.
        for byte in 0x80..=0xff {
            assert_eq!(
                words(&[b'a', byte, b'b']),
                [[b'a', byte, b'b']],
                "{byte:#04x}"
            );
        }
    }

    fn forwarded_options(options: &str) -> Option<String> {
        let forwarded = forwarded_parameters(&params(&[("options", options)])).unwrap();
        forwarded
            .into_iter()
            .find(|(name, _)| name == "options")
            .map(|(_, value)| value)
    }

    #[test]
    fn a_setting_smuggled_after_any_space_byte_is_dropped() {
        for space in SPACE_BYTES {
            let s = char::from(space);
            let options = format!(
                "-c application_name=x{s}-c{s}role=other{s}-c{s}request.jwt.claims=y{s}--rlsgate.session=z{s}-cpg_session_jwt.jwk=k"
            );
            assert_eq!(
                forwarded_options(&options).as_deref(),
                Some("-c application_name=x"),
                "{space:#04x}"
            );
        }
    }

    #[test]
    fn settings_holding_control_or_non_ascii_bytes_are_dropped() {
        for options in [
            "-c application_name=caf\u{e9}",
            "-c application_name=a\\\u{7}b",
            "-c application_name=a\\\tb",
            "-c search_path=\u{7f}",
            "-c \u{e9}=x",
            "-c application_name=a\u{a0}-c\u{a0}role=other",
        ] {
            assert_eq!(forwarded_options(options), None, "{options:?}");
            let with_harmless = format!("{options} -c statement_timeout=5s");
            assert_eq!(
                forwarded_options(&with_harmless).as_deref(),
                Some("-c statement_timeout=5s"),
                "{options:?}"
            );
        }
    }

    #[test]
    fn what_is_kept_splits_back_into_the_same_settings() {
        // Options built from the bytes that matter, in a fixed pseudo-random
        // sequence so that a failure repeats.
        let alphabet = [
            "-c",
            "--",
            " ",
            "\t",
            "\u{b}",
            "\\",
            "=",
            "-",
            "role",
            "rlsgate.session",
            "a",
            "x.y",
            "\u{e9}",
            "\u{a0}",
            "\u{7}",
        ];
        let mut state: u32 = 0x9e37_79b9;
        for _ in 0..5_000 {
            let mut options = String::new();
            for _ in 0..12 {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                options.push_str(alphabet[state as usize % alphabet.len()]);
            }
            let Some(kept) = forwarded_options(&options) else {
                continue;
            };
            let words = split_options(&kept);
            assert_eq!(words.len() % 2, 0, "{options:?} -> {kept:?}");
            for pair in words.chunks(2) {
                assert_eq!(pair[0], "-c", "{options:?} -> {kept:?}");
                let setting = &pair[1];
                let (name, _) = setting.split_once('=').expect("a value");
                assert!(
                    !is_identity_setting(&name.replace('-', "_")),
                    "{options:?} -> {kept:?}"
                );
                assert!(
                    setting.bytes().all(|b| (0x20..=0x7e).contains(&b)),
                    "{kept:?}"
                );
            }
            // Filtering again changes nothing: the server reads what the
            // proxy meant.
            assert_eq!(forwarded_options(&kept).as_deref(), Some(kept.as_str()));
        }
    }

    #[test]
    fn replication_is_refused() {
        let err = forwarded_parameters(&params(&[("replication", "database")])).unwrap_err();
        assert_eq!(err.sqlstate, sqlstate::FEATURE_NOT_SUPPORTED);
    }
}
