//! Decoding: bytes of a source → validated events, or quarantine records with reasons.
//!
//! Two formats are read: JSON lines ([`decode_json_lines`]) and Parquet ([`decode_parquet`]);
//! [`decode_source`] picks one by file name or content.
//!
//! Guarantees:
//! - **Nothing is dropped silently.** Every input record (a non-blank line, a Parquet row) ends
//!   up in exactly one of [`Decoded::events`] and [`Decoded::quarantined`], with a reason a person
//!   can read. A source that cannot be read as a whole (unknown format, unreadable Parquet, a
//!   required column missing) is exactly one quarantine record with position `file` and no events:
//!   a file is never partly accepted.
//! - **One rulebook.** Both formats reduce a record to raw field values (`RawEvent`) and call
//!   the same `validate`, so the same record gets the same verdict and the same reason in either
//!   format.
//! - **Never panics** on any input: no unchecked arithmetic or indexing on input values. The
//!   Parquet reader is a third-party library and is additionally run under `catch_unwind`.
//! - **Deterministic**: the output depends only on the bytes (and the label), in input order.
//!
//! The rules (field → accepted values):
//! - `event_id`: optional; a string of 1 to [`MAX_EVENT_ID_BYTES`] bytes. An empty string is
//!   rejected, not treated as missing.
//! - `event_type`: `impression`, `click` or `conversion` (case-sensitive).
//! - `event_time`: RFC 3339 with any offset (JSON), an integer of epoch microseconds (JSON, Parquet
//!   `Int64`) or a Parquet timestamp of any unit (a timestamp without time zone is taken as UTC);
//!   converted to UTC microseconds, truncated towards the past, and within
//!   [`MIN_EVENT_TIME_US`] ≤ t < [`END_EVENT_TIME_US`] (1970-01-01 to 2200-01-01).
//! - `ad_id`, `campaign_id`, `advertiser_id`, `user_id`: a non-negative 64-bit integer (JSON
//!   floats, strings and out-of-range numbers are rejected).
//! - `country`: exactly two ASCII capital letters (ISO 3166 alpha-2).
//! - `ip`: a string that parses as an IPv4 or IPv6 address; kept as sent.
//! - `cost_micros`, `revenue_micros`: optional (missing or null is `None`); 0 to
//!   [`MAX_AMOUNT_MICROS`].
//! - `producer`: 1 to [`MAX_PRODUCER_BYTES`] bytes of `a-z`, `0-9`, `_`, `-`.
//! - `revision`: optional (missing or null is 0); 0 to `u32::MAX`.
//! - Any other field or column is ignored (forward compatible; this includes the raw layer's own
//!   `dedup_key`, `source`, `source_hash` and `key_algorithm`).

use std::fmt;
use std::net::IpAddr;

use adsmetrics_dataflows::{Country, EventType};
use arrow::datatypes::TimeUnit;
use chrono::DateTime;
use compact_str::CompactString;

use crate::event::{Event, Quarantined, MAX_AMOUNT_MICROS};

mod json;
mod parquet;

pub use self::json::{decode_json_lines, decode_json_message};
pub use self::parquet::{decode_parquet, decode_parquet_parallel};

/// What one source decoded to. Every input record ends up in exactly one of the two vectors
/// (or the whole source is one quarantine record).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    /// The valid events, in input order.
    pub events: Vec<Event>,
    /// The rejected records (or the one rejected source), in input order.
    pub quarantined: Vec<Quarantined>,
}

/// Longest accepted `event_id`, in bytes.
pub const MAX_EVENT_ID_BYTES: usize = 256;

/// Longest accepted `producer`, in bytes.
pub const MAX_PRODUCER_BYTES: usize = 32;

/// Earliest accepted event time: 1970-01-01T00:00:00Z, in UTC microseconds.
pub const MIN_EVENT_TIME_US: i64 = 0;

/// First rejected event time: 2200-01-01T00:00:00Z (84,006 days after the epoch), in UTC
/// microseconds.
pub const END_EVENT_TIME_US: i64 = 84_006 * 86_400 * 1_000_000;

/// Most bytes of a rejected file kept in its quarantine record; the reason says when it was cut.
pub const MAX_RAW_FILE_BYTES: usize = 1 << 20;

/// Decodes one source, choosing the format by the file name in `source`, else by content.
///
/// A name ending in `.parquet` is Parquet; `.jsonl`, `.json` or `.ndjson` is JSON lines (both
/// case-insensitive). Otherwise, content starting with the Parquet magic `PAR1` is Parquet, and
/// anything else is one quarantine record with position `file`. Sources without a file name (a
/// message queue, say) whose records are JSON should call [`decode_json_lines`] directly.
///
/// `source` is only a label: it is copied into every quarantine record and never opened.
pub fn decode_source(source: &str, bytes: &[u8]) -> Decoded {
    match format_of(source, bytes) {
        Some(Format::Parquet) => decode_parquet(source, bytes::Bytes::copy_from_slice(bytes)),
        Some(Format::JsonLines) => decode_json_lines(source, bytes),
        None => unknown_format(source, bytes),
    }
}

/// Like [`decode_source`], taking the bytes without a copy; a Parquet file is decoded on up to
/// `parts` threads ([`decode_parquet_parallel`]), with the same result.
pub fn decode_source_parallel(source: &str, bytes: bytes::Bytes, parts: usize) -> Decoded {
    match format_of(source, &bytes) {
        Some(Format::Parquet) => decode_parquet_parallel(source, bytes, parts),
        Some(Format::JsonLines) => decode_json_lines(source, &bytes),
        None => unknown_format(source, &bytes),
    }
}

enum Format {
    Parquet,
    JsonLines,
}

/// The format of `source`, by its file name, else (Parquet only) by content.
fn format_of(source: &str, bytes: &[u8]) -> Option<Format> {
    let name = source.rsplit(['/', '\\']).next().unwrap_or(source);
    let ext = name.rsplit_once('.').map(|(_, ext)| ext).unwrap_or("");
    let is = |e: &str| ext.eq_ignore_ascii_case(e);
    if is("parquet") {
        Some(Format::Parquet)
    } else if is("jsonl") || is("json") || is("ndjson") {
        Some(Format::JsonLines)
    } else if bytes.starts_with(b"PAR1") {
        Some(Format::Parquet)
    } else {
        None
    }
}

fn unknown_format(source: &str, bytes: &[u8]) -> Decoded {
    file_quarantine(
        source,
        bytes,
        format!(
            "{source:?} is neither Parquet (a .parquet name or PAR1 magic) nor JSON lines \
             (a .jsonl, .json or .ndjson name)"
        ),
    )
}

/// The whole of `source` as one quarantine record with position `file`, keeping at most
/// [`MAX_RAW_FILE_BYTES`] of it (and saying so in the reason when it was cut).
pub(crate) fn file_quarantine(source: &str, bytes: &[u8], mut reason: String) -> Decoded {
    let raw = match bytes.get(..MAX_RAW_FILE_BYTES) {
        Some(head) if head.len() < bytes.len() => {
            reason.push_str(&format!(
                " (raw holds the first {MAX_RAW_FILE_BYTES} of {} bytes)",
                bytes.len()
            ));
            head.to_vec()
        }
        _ => bytes.to_vec(),
    };
    Decoded {
        events: Vec::new(),
        quarantined: vec![Quarantined {
            source: source.to_owned(),
            position: "file".to_owned(),
            raw,
            reason,
        }],
    }
}

/// One field's value as found in a source, before validation. Borrowed from the source, so
/// building one costs nothing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Raw<'a> {
    /// The field (JSON) or column (Parquet) is not there.
    Absent,
    /// An explicit null.
    Null,
    /// An integer in the `i64` range.
    Int(i64),
    /// An integer above `i64::MAX`.
    UInt(u64),
    /// A JSON number with a fraction or exponent, or an integer outside the 64-bit range.
    Float(f64),
    /// A JSON boolean.
    Bool(bool),
    /// A string.
    Str(&'a str),
    /// A Parquet timestamp: the stored value and its unit.
    Time(i64, TimeUnit),
    /// A JSON array or object, shown in reasons as this text (`[…]` or `{…}`).
    Nested(&'static str),
}

/// Longest string value quoted in a reason, in bytes (longer ones are cut, the raw has them all).
const MAX_QUOTED_BYTES: usize = 64;

impl fmt::Display for Raw<'_> {
    /// The value as a reason quotes it: strings quoted and escaped (and cut when long).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Raw::Absent => f.write_str("(missing)"),
            Raw::Null => f.write_str("null"),
            Raw::Int(v) => write!(f, "{v}"),
            Raw::UInt(v) => write!(f, "{v}"),
            Raw::Float(v) => write!(f, "{v:?}"),
            Raw::Bool(v) => write!(f, "{v}"),
            Raw::Str(s) if s.len() <= MAX_QUOTED_BYTES => write!(f, "{s:?}"),
            Raw::Str(s) => {
                let mut cut = MAX_QUOTED_BYTES;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                let head = s.get(..cut).unwrap_or("");
                write!(f, "{head:?}… ({} bytes)", s.len())
            }
            Raw::Time(v, unit) => write!(f, "{v} {} since the epoch", unit_name(unit)),
            Raw::Nested(kind) => f.write_str(kind),
        }
    }
}

fn unit_name(unit: TimeUnit) -> &'static str {
    match unit {
        TimeUnit::Second => "seconds",
        TimeUnit::Millisecond => "milliseconds",
        TimeUnit::Microsecond => "microseconds",
        TimeUnit::Nanosecond => "nanoseconds",
    }
}

/// `value` in `unit` as microseconds (nanoseconds truncated towards the past); `None` when it does
/// not fit in an `i64`.
pub(crate) fn to_micros(value: i64, unit: TimeUnit) -> Option<i64> {
    match unit {
        TimeUnit::Second => value.checked_mul(1_000_000),
        TimeUnit::Millisecond => value.checked_mul(1_000),
        TimeUnit::Microsecond => Some(value),
        TimeUnit::Nanosecond => value.checked_div_euclid(1_000),
    }
}

/// One record's fields as found in a source; the input of [`validate`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawEvent<'a> {
    pub(crate) event_id: Raw<'a>,
    pub(crate) event_type: Raw<'a>,
    pub(crate) event_time: Raw<'a>,
    pub(crate) ad_id: Raw<'a>,
    pub(crate) campaign_id: Raw<'a>,
    pub(crate) advertiser_id: Raw<'a>,
    pub(crate) country: Raw<'a>,
    pub(crate) user_id: Raw<'a>,
    pub(crate) ip: Raw<'a>,
    pub(crate) cost_micros: Raw<'a>,
    pub(crate) revenue_micros: Raw<'a>,
    pub(crate) producer: Raw<'a>,
    pub(crate) revision: Raw<'a>,
}

impl<'a> RawEvent<'a> {
    /// The fields with their names, in the order of the event schema.
    pub(crate) fn fields(&self) -> [(&'static str, Raw<'a>); 13] {
        [
            ("event_id", self.event_id),
            ("event_type", self.event_type),
            ("event_time", self.event_time),
            ("ad_id", self.ad_id),
            ("campaign_id", self.campaign_id),
            ("advertiser_id", self.advertiser_id),
            ("country", self.country),
            ("user_id", self.user_id),
            ("ip", self.ip),
            ("cost_micros", self.cost_micros),
            ("revenue_micros", self.revenue_micros),
            ("producer", self.producer),
            ("revision", self.revision),
        ]
    }
}

/// The rulebook: the event `raw` describes, or why it is not one. Shared by every format.
///
/// Checks run in schema order, so a record with several faults is reported by its first one.
/// Strings are copied only once every check has passed.
pub(crate) fn validate(raw: &RawEvent<'_>) -> Result<Event, String> {
    let event_id = match raw.event_id {
        Raw::Absent | Raw::Null => None,
        Raw::Str("") => return Err("event_id is empty".to_owned()),
        Raw::Str(s) if s.len() > MAX_EVENT_ID_BYTES => {
            return Err(format!(
                "event_id {} is longer than {MAX_EVENT_ID_BYTES} bytes",
                raw.event_id
            ))
        }
        Raw::Str(s) => Some(s),
        other => return Err(format!("event_id {other} is not a string")),
    };
    let event_type_str = required_str("event_type", raw.event_type)?;
    let event_type = EventType::parse(event_type_str).ok_or_else(|| {
        format!(
            "event_type {} is not one of impression, click, conversion",
            raw.event_type
        )
    })?;
    let event_time_us = event_time(raw.event_time)?;
    let ad_id = id("ad_id", raw.ad_id)?;
    let campaign_id = id("campaign_id", raw.campaign_id)?;
    let advertiser_id = id("advertiser_id", raw.advertiser_id)?;
    let country = Country::parse(required_str("country", raw.country)?)
        .ok_or_else(|| format!("country {} is not an ISO 3166 alpha-2 code", raw.country))?;
    let user_id = id("user_id", raw.user_id)?;
    let ip = required_str("ip", raw.ip)?;
    if !is_plain_ipv4(ip.as_bytes()) && ip.parse::<IpAddr>().is_err() {
        return Err(format!("ip {} is not an IPv4 or IPv6 address", raw.ip));
    }
    let cost_micros = amount("cost_micros", raw.cost_micros)?;
    let revenue_micros = amount("revenue_micros", raw.revenue_micros)?;
    let producer = required_str("producer", raw.producer)?;
    let producer_ok = (1..=MAX_PRODUCER_BYTES).contains(&producer.len())
        && producer
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !producer_ok {
        return Err(format!(
            "producer {} is not 1 to {MAX_PRODUCER_BYTES} characters of a-z, 0-9, '_' and '-'",
            raw.producer
        ));
    }
    let revision = match raw.revision {
        Raw::UInt(_) => {
            return Err(format!(
                "revision {} exceeds the maximum of {}",
                raw.revision,
                u32::MAX
            ))
        }
        r => match int("revision", r)? {
            None => 0,
            Some(v) if v < 0 => return Err(format!("revision {v} is negative")),
            Some(v) => u32::try_from(v)
                .map_err(|_| format!("revision {v} exceeds the maximum of {}", u32::MAX))?,
        },
    };
    Ok(Event {
        event_id: event_id.map(CompactString::from),
        event_type,
        event_time_us,
        ad_id,
        campaign_id,
        advertiser_id,
        country,
        user_id,
        ip: CompactString::from(ip),
        cost_micros,
        revenue_micros,
        producer: CompactString::from(producer),
        revision,
    })
}

/// Whether `s` is a dotted-quad IPv4 address exactly as `Ipv4Addr::from_str` accepts one: four
/// decimal octets of 0 to 255 without leading zeros. The std parser is a noticeable share of the
/// decode time; this is only a shortcut, whatever it rejects is still given to std.
fn is_plain_ipv4(s: &[u8]) -> bool {
    // One pass over the bytes (splitting on '.' first was 1.8% of a load's time).
    let (mut octets, mut i) = (0, 0);
    loop {
        let start = i;
        let mut value = 0u32;
        while i < s.len() && s[i].is_ascii_digit() && i - start < 3 {
            value = value * 10 + u32::from(s[i] - b'0');
            i += 1;
        }
        let digits = i - start;
        if digits == 0 || (digits > 1 && s[start] == b'0') || value > 255 {
            return false;
        }
        octets += 1;
        match s.get(i) {
            None => return octets == 4,
            Some(b'.') if octets < 4 => i += 1,
            Some(_) => return false,
        }
    }
}

fn missing(field: &str, raw: Raw<'_>) -> String {
    match raw {
        Raw::Null => format!("{field} is null"),
        _ => format!("{field} is missing"),
    }
}

fn required_str<'a>(field: &str, raw: Raw<'a>) -> Result<&'a str, String> {
    match raw {
        Raw::Str(s) => Ok(s),
        Raw::Absent | Raw::Null => Err(missing(field, raw)),
        other => Err(format!("{field} {other} is not a string")),
    }
}

/// An optional integer: `None` for missing or null.
fn int(field: &str, raw: Raw<'_>) -> Result<Option<i64>, String> {
    match raw {
        Raw::Absent | Raw::Null => Ok(None),
        Raw::Int(v) => Ok(Some(v)),
        Raw::UInt(_) => Err(format!(
            "{field} {raw} is out of the signed 64-bit integer range"
        )),
        Raw::Float(_) => Err(format!("{field} {raw} is not a 64-bit integer")),
        other => Err(format!("{field} {other} is not an integer")),
    }
}

/// A required, non-negative id.
fn id(field: &str, raw: Raw<'_>) -> Result<i64, String> {
    match int(field, raw)? {
        None => Err(missing(field, raw)),
        Some(v) if v < 0 => Err(format!("{field} {v} is negative")),
        Some(v) => Ok(v),
    }
}

/// An optional amount in micros, `0..=MAX_AMOUNT_MICROS`.
fn amount(field: &str, raw: Raw<'_>) -> Result<Option<i64>, String> {
    match raw {
        Raw::UInt(_) => Err(format!(
            "{field} {raw} exceeds the maximum of {MAX_AMOUNT_MICROS}"
        )),
        _ => match int(field, raw)? {
            Some(v) if v < 0 => Err(format!("{field} {v} is negative")),
            Some(v) if v > MAX_AMOUNT_MICROS => Err(format!(
                "{field} {v} exceeds the maximum of {MAX_AMOUNT_MICROS}"
            )),
            v => Ok(v),
        },
    }
}

fn event_time(raw: Raw<'_>) -> Result<i64, String> {
    let us = match raw {
        Raw::Absent | Raw::Null => return Err(missing("event_time", raw)),
        Raw::Int(v) => Some(v),
        Raw::Time(v, unit) => to_micros(v, unit),
        Raw::UInt(_) => None,
        Raw::Str(s) => {
            let t = DateTime::parse_from_rfc3339(s)
                .map_err(|e| format!("event_time {raw} is not an RFC 3339 timestamp ({e})"))?;
            // Fits for every date chrono can represent (about ±262,000 years); checked anyway.
            t.timestamp()
                .checked_mul(1_000_000)
                .and_then(|us| us.checked_add(i64::from(t.timestamp_subsec_micros())))
        }
        other => {
            return Err(format!(
            "event_time {other} is neither an RFC 3339 string nor an integer of epoch microseconds"
        ))
        }
    };
    match us {
        Some(us) if (MIN_EVENT_TIME_US..END_EVENT_TIME_US).contains(&us) => Ok(us),
        _ => Err(format!(
            "event_time {raw} is outside the accepted range 1970-01-01T00:00:00Z (inclusive) to \
             2200-01-01T00:00:00Z (exclusive)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_of_range_is_2200() {
        let end =
            DateTime::parse_from_rfc3339("2200-01-01T00:00:00Z").map(|t| t.timestamp_micros());
        assert_eq!(end, Ok(END_EVENT_TIME_US));
    }

    #[test]
    fn long_strings_are_cut_in_reasons() {
        let long = "é".repeat(100);
        let shown = Raw::Str(&long).to_string();
        assert!(shown.len() < 100, "{shown}");
        assert!(shown.ends_with("(200 bytes)"), "{shown}");
    }

    #[test]
    fn the_ipv4_shortcut_accepts_only_what_std_accepts() {
        let mut octets: Vec<String> = vec![
            String::new(),
            "+1".into(),
            "-0".into(),
            " 1".into(),
            "0x1".into(),
        ];
        for len in 1..=4u32 {
            octets
                .extend((0..10u32.pow(len)).map(|n| format!("{n:0width$}", width = len as usize)));
        }
        for octet in &octets {
            for ip in [
                format!("{octet}.1.2.3"),
                format!("1.2.3.{octet}"),
                format!("9.{octet}.255.0"),
            ] {
                let std = ip.parse::<std::net::Ipv4Addr>().is_ok();
                assert_eq!(is_plain_ipv4(ip.as_bytes()), std, "{ip}");
            }
        }
        for ip in [
            "1.2.3",
            "1.2.3.4.5",
            "1..2.3",
            ".1.2.3",
            "1.2.3.",
            "",
            "::1",
            "1.2.3.4\n",
        ] {
            assert!(!is_plain_ipv4(ip.as_bytes()), "{ip}");
        }
    }

    #[test]
    fn nanoseconds_truncate_towards_the_past() {
        assert_eq!(to_micros(-1, TimeUnit::Nanosecond), Some(-1));
        assert_eq!(to_micros(1_999, TimeUnit::Nanosecond), Some(1));
        assert_eq!(to_micros(i64::MAX, TimeUnit::Second), None);
    }
}
