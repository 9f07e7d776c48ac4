//! JSON lines: one JSON object per line → events, or one quarantine record per bad line.
//!
//! Guarantees:
//! - Every line that is not blank (empty, or only spaces, tabs and a `\r`) is exactly one event or
//!   one quarantine record with position `line N` (1-based, counting every line), `raw` = the line
//!   without its terminator. Lines end at `\n`; a trailing `\r` is dropped; the last line needs no
//!   terminator; a UTF-8 byte order mark at the very start is skipped.
//! - A line that is not UTF-8, not JSON, not one object, has a field twice, or breaks a rule of the
//!   shared rulebook ([`super::validate`]) is quarantined with the reason.
//! - Unknown fields are ignored; a field set to `null` is treated like a missing one (the reason
//!   says which).
//!
//! Speed: each line is parsed once by serde_json into a struct of borrowed raw values (strings are
//! copied only when they contain escapes), and nested values of unknown fields are skipped without
//! being built.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::{validate, Decoded, Raw, RawEvent};
use crate::event::Quarantined;

/// Decodes JSON lines. `source` is only a label copied into quarantine records.
///
/// Never fails as a whole: every non-blank line is an event or a quarantine record.
pub fn decode_json_lines(source: &str, bytes: &[u8]) -> Decoded {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut out = Decoded::default();
    let mut rest = bytes;
    let mut number: usize = 0;
    while !rest.is_empty() {
        let (line, next) = match find_newline(rest) {
            Some(end) => (
                rest.get(..end).unwrap_or(rest),
                rest.get(end.saturating_add(1)..).unwrap_or(&[]),
            ),
            None => (rest, &[][..]),
        };
        rest = next;
        number = number.saturating_add(1);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(|&b| b == b' ' || b == b'\t' || b == b'\r') {
            continue;
        }
        match decode_line(line) {
            Ok(event) => out.events.push(event),
            Err(reason) => out.quarantined.push(Quarantined {
                source: source.to_owned(),
                position: format!("line {number}"),
                raw: line.to_vec(),
                reason,
            }),
        }
    }
    out
}

/// The index of the first `\n` in `s`, eight bytes at a time (a plain byte loop is a sizeable
/// share of the decode time).
fn find_newline(s: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    const NEWLINES: u64 = ONES * b'\n' as u64;
    let mut chunks = s.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let Ok(word) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let x = u64::from_le_bytes(word) ^ NEWLINES;
        // High bit set in each zero byte of `x` (and possibly in bytes after one, never before):
        // the lowest one marks the first newline.
        let zeros = x.wrapping_sub(ONES) & !x & HIGHS;
        if zeros != 0 {
            return Some(offset + (zeros.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    s.get(offset..)?
        .iter()
        .position(|&b| b == b'\n')
        .map(|i| offset + i)
}

/// Decodes one message of a message queue (a Kafka record value): the same rules as one line of
/// JSON lines, except that the message may span lines and that a message without a `producer`
/// field takes `producer` (from the message's `producer` header) when one is given. The caller
/// quarantines an `Err` with the message's position (topic, partition, offset).
pub fn decode_json_message(
    bytes: &[u8],
    producer: Option<&str>,
) -> Result<crate::event::Event, String> {
    let bytes = bytes
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(bytes)
        .trim_ascii();
    if bytes.is_empty() {
        return Err("message is empty".to_string());
    }
    decode_record(bytes, producer)
}

fn decode_line(line: &[u8]) -> Result<crate::event::Event, String> {
    decode_record(line, None)
}

fn decode_record(line: &[u8], producer: Option<&str>) -> Result<crate::event::Event, String> {
    let text = std::str::from_utf8(line).map_err(|e| {
        format!(
            "line is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        )
    })?;
    if !text.trim_start_matches([' ', '\t', '\r']).starts_with('{') {
        // A struct would also accept a JSON array (by position): only objects are records.
        return Err(match serde_json::from_str::<IgnoredAny>(text) {
            Ok(_) => format!("line is JSON but not an object: {}", kind_of(text)),
            Err(e) => format!("line is not valid JSON: {e}"),
        });
    }
    let record: Record<'_> =
        serde_json::from_str(text).map_err(|e| format!("line is not a valid JSON object: {e}"))?;
    let mut raw = record.raw();
    if let (Raw::Absent, Some(producer)) = (raw.producer, producer) {
        raw.producer = Raw::Str(producer);
    }
    validate(&raw)
}

/// What a valid JSON text that is not an object is, for the reason.
fn kind_of(text: &str) -> &'static str {
    match text.trim_start().as_bytes().first() {
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b'n') => "null",
        Some(b't' | b'f') => "a boolean",
        _ => "a number",
    }
}

/// One line's known fields, each as found (or [`Value::Absent`]).
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow, default)]
    event_id: Value<'a>,
    #[serde(borrow, default)]
    event_type: Value<'a>,
    #[serde(borrow, default)]
    event_time: Value<'a>,
    #[serde(borrow, default)]
    ad_id: Value<'a>,
    #[serde(borrow, default)]
    campaign_id: Value<'a>,
    #[serde(borrow, default)]
    advertiser_id: Value<'a>,
    #[serde(borrow, default)]
    country: Value<'a>,
    #[serde(borrow, default)]
    user_id: Value<'a>,
    #[serde(borrow, default)]
    ip: Value<'a>,
    #[serde(borrow, default)]
    cost_micros: Value<'a>,
    #[serde(borrow, default)]
    revenue_micros: Value<'a>,
    #[serde(borrow, default)]
    producer: Value<'a>,
    #[serde(borrow, default)]
    revision: Value<'a>,
}

impl Record<'_> {
    fn raw(&self) -> RawEvent<'_> {
        RawEvent {
            event_id: self.event_id.raw(),
            event_type: self.event_type.raw(),
            event_time: self.event_time.raw(),
            ad_id: self.ad_id.raw(),
            campaign_id: self.campaign_id.raw(),
            advertiser_id: self.advertiser_id.raw(),
            country: self.country.raw(),
            user_id: self.user_id.raw(),
            ip: self.ip.raw(),
            cost_micros: self.cost_micros.raw(),
            revenue_micros: self.revenue_micros.raw(),
            producer: self.producer.raw(),
            revision: self.revision.raw(),
        }
    }
}

/// Any JSON value, kept only as far as validation needs: scalars as they are, strings borrowed
/// from the line when they have no escapes, arrays and objects skipped.
#[derive(Default)]
enum Value<'a> {
    #[default]
    Absent,
    Null,
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(Cow<'a, str>),
    Array,
    Object,
}

impl Value<'_> {
    fn raw(&self) -> Raw<'_> {
        match self {
            Value::Absent => Raw::Absent,
            Value::Null => Raw::Null,
            Value::Int(v) => Raw::Int(*v),
            Value::UInt(v) => Raw::UInt(*v),
            Value::Float(v) => Raw::Float(*v),
            Value::Bool(v) => Raw::Bool(*v),
            Value::Str(s) => Raw::Str(s),
            Value::Array => Raw::Nested("[…]"),
            Value::Object => Raw::Nested("{…}"),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Value<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(i64::try_from(v).map_or(Value::UInt(v), Value::Int))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Value::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Value::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Value::Str(Cow::Owned(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Value::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Value::Object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_newline_agrees_with_a_byte_loop() {
        let mut text = Vec::new();
        for i in 0..300u32 {
            text.push(if i % 37 == 0 || i % 11 == 3 {
                b'\n'
            } else {
                (i % 251) as u8 ^ 0x80
            });
        }
        for start in 0..text.len() {
            let s = &text[start..];
            assert_eq!(
                find_newline(s),
                s.iter().position(|&b| b == b'\n'),
                "at {start}"
            );
        }
        assert_eq!(find_newline(b""), None);
        assert_eq!(find_newline(b"\x0b\x0a"), Some(1));
        assert_eq!(find_newline(&[0x8a; 20]), None);
    }
}
