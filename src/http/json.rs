//! The JSON the serverless driver reads: results as Postgres sent them
//! (`Neon-Raw-Text-Output`) or as JSON values, rows as arrays
//! (`Neon-Array-Mode`) or objects, and errors with Neon's field names.

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{
    DataRowBody, ErrorResponseBody, Message, RowDescriptionBody,
};
use serde::Serialize;

use crate::protocol::frame::Frame;
use crate::protocol::refusal::Refusal;

/// The response grew past `[http] max_response_bytes`.
#[derive(Debug)]
pub(crate) struct TooLarge;

/// Writes results as they arrive, so a response is built once and its
/// size checked as it grows.
pub(crate) struct Encoder {
    out: Vec<u8>,
    limit: usize,
    raw_text: bool,
    array_mode: bool,
    /// The current result's columns: name and type.
    columns: Vec<(String, u32)>,
    /// Within a batch: results written so far.
    results: Option<usize>,
    rows: usize,
}

impl Encoder {
    pub(crate) fn new(limit: usize, raw_text: bool, array_mode: bool) -> Encoder {
        Encoder {
            out: Vec::with_capacity(256),
            limit,
            raw_text,
            array_mode,
            columns: Vec::new(),
            results: None,
            rows: 0,
        }
    }

    pub(crate) fn begin_batch(&mut self) {
        self.out.extend_from_slice(b"{\"results\":[");
        self.results = Some(0);
    }

    pub(crate) fn end_batch(&mut self) -> Result<(), TooLarge> {
        self.out.extend_from_slice(b"]}");
        self.checked()
    }

    /// A statement's columns (`None`: it returns no rows); its rows follow.
    pub(crate) fn fields(&mut self, fields: Option<&RowDescriptionBody>) -> Result<(), TooLarge> {
        if let Some(done) = &mut self.results {
            if *done > 0 {
                self.out.push(b',');
            }
            *done += 1;
        }
        self.columns.clear();
        self.rows = 0;
        self.out.extend_from_slice(b"{\"fields\":[");
        let mut fields = fields.map(RowDescriptionBody::fields);
        while let Some(Ok(Some(field))) = fields.as_mut().map(FallibleIterator::next) {
            if !self.columns.is_empty() {
                self.out.push(b',');
            }
            let described = Field {
                name: field.name(),
                data_type_id: field.type_oid(),
                table_id: field.table_oid(),
                column_id: field.column_id(),
                data_type_size: field.type_size(),
                data_type_modifier: field.type_modifier(),
                format: "text",
            };
            write_json(&mut self.out, &described);
            self.columns
                .push((field.name().to_owned(), field.type_oid()));
        }
        self.out.extend_from_slice(b"],\"rows\":[");
        self.checked()
    }

    pub(crate) fn row(&mut self, row: &DataRowBody) -> Result<(), TooLarge> {
        if self.rows > 0 {
            self.out.push(b',');
        }
        self.rows += 1;
        self.out.push(if self.array_mode { b'[' } else { b'{' });
        let buffer = row.buffer();
        let mut ranges = row.ranges();
        let mut column = 0;
        while let Ok(Some(range)) = ranges.next() {
            if column > 0 {
                self.out.push(b',');
            }
            let (name, oid) = self.columns.get(column).cloned().unwrap_or_default();
            if !self.array_mode {
                write_json(&mut self.out, &name);
                self.out.push(b':');
            }
            let text = range.map(|r| String::from_utf8_lossy(&buffer[r]));
            match text {
                None => self.out.extend_from_slice(b"null"),
                Some(text) if self.raw_text => write_json(&mut self.out, &text),
                Some(text) => write_value(&mut self.out, oid, &text),
            }
            column += 1;
        }
        self.out.push(if self.array_mode { b']' } else { b'}' });
        self.checked()
    }

    /// The statement's CommandComplete tag (`""` for an empty query).
    pub(crate) fn complete(&mut self, tag: &str) -> Result<(), TooLarge> {
        let command = tag.split(' ').next().unwrap_or("");
        let count = tag.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok());
        self.out.extend_from_slice(b"],\"command\":");
        write_json(&mut self.out, &command);
        self.out.extend_from_slice(b",\"rowCount\":");
        write_json(&mut self.out, &count);
        self.out.extend_from_slice(b",\"rowAsArray\":");
        write_json(&mut self.out, &self.array_mode);
        self.out.push(b'}');
        self.checked()
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.out
    }

    fn checked(&self) -> Result<(), TooLarge> {
        if self.out.len() > self.limit {
            Err(TooLarge)
        } else {
            Ok(())
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Field<'a> {
    name: &'a str,
    #[serde(rename = "dataTypeID")]
    data_type_id: u32,
    #[serde(rename = "tableID")]
    table_id: u32,
    #[serde(rename = "columnID")]
    column_id: i16,
    data_type_size: i16,
    data_type_modifier: i32,
    format: &'static str,
}

fn write_json(out: &mut Vec<u8>, value: &impl Serialize) {
    // Writing to a Vec fails only for values that cannot be JSON (maps
    // with non-string keys), which none of these are.
    let _ = serde_json::to_writer(&mut *out, value);
}

mod oid {
    pub const BOOL: u32 = 16;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const JSON: u32 = 114;
    pub const JSONB: u32 = 3802;
}

/// The element type of the built-in array types, by the array's type.
fn element_of(array: u32) -> Option<u32> {
    Some(match array {
        1000 => oid::BOOL,
        1001 => 17, // bytea
        1005 => oid::INT2,
        1007 => oid::INT4,
        1016 => 20, // int8
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        1009 => 25,   // text
        1014 => 1042, // bpchar
        1015 => 1043, // varchar
        1028 => 26,   // oid
        199 => oid::JSON,
        3807 => oid::JSONB,
        1231 => 1700, // numeric
        1182 => 1082, // date
        1183 => 1083, // time
        1115 => 1114, // timestamp
        1185 => 1184, // timestamptz
        1187 => 1186, // interval
        2951 => 2950, // uuid
        _ => return None,
    })
}

/// A value as the driver's JSON mode has it: booleans, the small number
/// types (finite ones) and JSON as themselves, arrays as arrays, and
/// everything else (int8 and numeric included, which a JavaScript number
/// would round) as Postgres's text.
fn write_value(out: &mut Vec<u8>, oid: u32, text: &str) {
    match oid {
        oid::BOOL => out.extend_from_slice(if text == "t" { b"true" } else { b"false" }),
        oid::INT2 | oid::INT4 | oid::FLOAT4 | oid::FLOAT8
            if text.parse::<f64>().is_ok_and(f64::is_finite) =>
        {
            out.extend_from_slice(text.as_bytes())
        }
        oid::JSON | oid::JSONB if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() => {
            out.extend_from_slice(text.as_bytes())
        }
        array => match element_of(array).zip(parse_array(text)) {
            Some((element, parsed)) => write_array(out, element, &parsed),
            None => write_json(out, &text),
        },
    }
}

/// An element of a Postgres array literal.
#[derive(Debug, PartialEq)]
enum Element {
    Null,
    Text(String),
    Array(Vec<Element>),
}

fn write_array(out: &mut Vec<u8>, element: u32, items: &[Element]) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match item {
            Element::Null => out.extend_from_slice(b"null"),
            Element::Text(text) => write_value(out, element, text),
            Element::Array(inner) => write_array(out, element, inner),
        }
    }
    out.push(b']');
}

/// Parses an array's text output (`{1,NULL,"a b"}`, nested, possibly with
/// bounds such as `[0:1]={…}`); `None` when it is not one.
fn parse_array(text: &str) -> Option<Vec<Element>> {
    let text = match text.strip_prefix('[') {
        Some(_) => &text[text.find('=')? + 1..],
        None => text,
    };
    let mut chars = text.chars().peekable();
    let parsed = parse_elements(&mut chars)?;
    chars.next().is_none().then_some(parsed)
}

fn parse_elements(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<Vec<Element>> {
    if chars.next()? != '{' {
        return None;
    }
    let mut items = Vec::new();
    if chars.peek() == Some(&'}') {
        chars.next();
        return Some(items);
    }
    loop {
        let item = match chars.peek()? {
            '{' => Element::Array(parse_elements(chars)?),
            '"' => {
                chars.next();
                let mut text = String::new();
                loop {
                    match chars.next()? {
                        '\\' => text.push(chars.next()?),
                        '"' => break,
                        c => text.push(c),
                    }
                }
                Element::Text(text)
            }
            _ => {
                let mut text = String::new();
                while let Some(&c) = chars.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    text.push(c);
                    chars.next();
                }
                if text.eq_ignore_ascii_case("NULL") {
                    Element::Null
                } else {
                    Element::Text(text)
                }
            }
        };
        items.push(item);
        match chars.next()? {
            ',' => continue,
            '}' => return Some(items),
            _ => return None,
        }
    }
}

/// An error for the driver's `NeonDbError`: the database's own, with all
/// its fields, or one of the proxy's refusals. Absent fields are `null`;
/// `position` and `line` are strings, as Postgres sends them.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DbError {
    pub(crate) message: String,
    pub(crate) code: String,
    pub(crate) severity: Option<String>,
    detail: Option<String>,
    hint: Option<String>,
    position: Option<String>,
    internal_position: Option<String>,
    internal_query: Option<String>,
    #[serde(rename = "where")]
    where_: Option<String>,
    schema: Option<String>,
    table: Option<String>,
    column: Option<String>,
    data_type: Option<String>,
    constraint: Option<String>,
    file: Option<String>,
    line: Option<String>,
    routine: Option<String>,
}

impl DbError {
    /// The fields of an ErrorResponse frame.
    pub(crate) fn from_frame(frame: Frame) -> DbError {
        match frame.into_message() {
            Ok(Message::ErrorResponse(body)) => DbError::from_body(&body),
            _ => DbError {
                message: "a malformed error from the database".to_owned(),
                code: "XX000".to_owned(),
                ..DbError::default()
            },
        }
    }

    fn from_body(body: &ErrorResponseBody) -> DbError {
        let mut error = DbError::default();
        let mut localized_severity = None;
        let mut fields = body.fields();
        while let Ok(Some(field)) = fields.next() {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            let slot = match field.type_() {
                b'M' => {
                    error.message = value;
                    continue;
                }
                b'C' => {
                    error.code = value;
                    continue;
                }
                b'V' => &mut error.severity,
                b'S' => &mut localized_severity,
                b'D' => &mut error.detail,
                b'H' => &mut error.hint,
                b'P' => &mut error.position,
                b'p' => &mut error.internal_position,
                b'q' => &mut error.internal_query,
                b'W' => &mut error.where_,
                b's' => &mut error.schema,
                b't' => &mut error.table,
                b'c' => &mut error.column,
                b'd' => &mut error.data_type,
                b'n' => &mut error.constraint,
                b'F' => &mut error.file,
                b'L' => &mut error.line,
                b'R' => &mut error.routine,
                _ => continue,
            };
            *slot = Some(value);
        }
        if error.severity.is_none() {
            error.severity = localized_severity;
        }
        error
    }

    /// A refusal of the proxy's: its SQLSTATE and the message a client
    /// is told (never the detail, which is for the log).
    pub(crate) fn refusal(refusal: &Refusal) -> DbError {
        DbError {
            message: refusal.message.clone(),
            code: refusal.sqlstate.to_string(),
            severity: Some("ERROR".to_owned()),
            ..DbError::default()
        }
    }

    /// Whether the error ends the connection.
    pub(crate) fn is_fatal(&self) -> bool {
        matches!(self.severity.as_deref(), Some("FATAL" | "PANIC") | None)
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::new();
        write_json(&mut out, self);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(oid: u32, text: &str) -> String {
        let mut out = Vec::new();
        write_value(&mut out, oid, text);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn values_take_the_json_types_the_driver_expects() {
        assert_eq!(value(16, "t"), "true");
        assert_eq!(value(16, "f"), "false");
        assert_eq!(value(23, "-7"), "-7");
        assert_eq!(value(701, "1.5e+20"), "1.5e+20");
        assert_eq!(value(701, "NaN"), "\"NaN\"");
        assert_eq!(value(700, "-Infinity"), "\"-Infinity\"");
        assert_eq!(value(20, "9007199254740993"), "\"9007199254740993\"");
        assert_eq!(value(1700, "1.10"), "\"1.10\"");
        assert_eq!(value(3802, r#"{"a": [1, "x"]}"#), r#"{"a": [1, "x"]}"#);
        assert_eq!(value(25, "say \"hi\"\n"), r#""say \"hi\"\n""#);
        assert_eq!(value(17, "\\x0102"), r#""\\x0102""#);
    }

    #[test]
    fn arrays_become_json_arrays_of_their_elements() {
        assert_eq!(value(1007, "{1,NULL,3}"), "[1,null,3]");
        assert_eq!(value(1007, "{{1,2},{3,4}}"), "[[1,2],[3,4]]");
        assert_eq!(value(1007, "[0:1]={5,6}"), "[5,6]");
        assert_eq!(
            value(1009, r#"{a,"b c","NULL","q\"\\"}"#),
            r#"["a","b c","NULL","q\"\\"]"#
        );
        assert_eq!(value(1000, "{t,f}"), "[true,false]");
        assert_eq!(value(1016, "{}"), "[]");
        // Not an array literal after all: kept as text.
        assert_eq!(value(1007, "{1,2"), r#""{1,2""#);
    }

    #[test]
    fn a_command_tag_gives_the_command_and_the_row_count() {
        let mut encoder = Encoder::new(1 << 20, true, true);
        encoder.fields(None).unwrap();
        encoder.complete("INSERT 0 3").unwrap();
        let text = String::from_utf8(encoder.finish()).unwrap();
        assert_eq!(
            text,
            r#"{"fields":[],"rows":[],"command":"INSERT","rowCount":3,"rowAsArray":true}"#
        );
        let mut encoder = Encoder::new(1 << 20, true, false);
        encoder.begin_batch();
        encoder.fields(None).unwrap();
        encoder.complete("CREATE TABLE").unwrap();
        encoder.fields(None).unwrap();
        encoder.complete("").unwrap();
        encoder.end_batch().unwrap();
        let text = String::from_utf8(encoder.finish()).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"results":[{"fields":[],"rows":[],"command":"CREATE","rowCount":null,"rowAsArray":false},"#,
                r#"{"fields":[],"rows":[],"command":"","rowCount":null,"rowAsArray":false}]}"#
            )
        );
    }

    #[test]
    fn a_response_past_its_limit_is_too_large() {
        let mut encoder = Encoder::new(10, true, true);
        assert!(encoder.fields(None).is_err());
    }

    #[test]
    fn a_refusal_is_an_error_with_its_sqlstate_and_null_fields() {
        let refusal = Refusal::auth("token expired").with_detail("secret detail");
        let json: serde_json::Value =
            serde_json::from_slice(&DbError::refusal(&refusal).to_json()).unwrap();
        assert_eq!(json["code"], "28000");
        assert_eq!(json["message"], "token expired");
        assert_eq!(json["position"], serde_json::Value::Null);
        assert!(!json.to_string().contains("secret"));
    }
}
