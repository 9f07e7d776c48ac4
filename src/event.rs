//! The decoded event, its stable keys, and the quarantine record for input that is not an event.
//!
//! # Key algorithm `adsmetrics-key-v1`
//! Both hashes are XXH3-128 (seed 0, as specified by the xxHash project and implemented by the
//! `xxhash-rust` crate) over a canonical byte encoding: a domain tag, then each field in a fixed
//! order, strings as a little-endian `u32` length and their UTF-8 bytes, integers as little-endian
//! 8 bytes, optional values as a presence byte (`0`/`1`) and the value.
//! - dedup key, with an event id: tag `adsmetrics/key/v1/id`, then producer, event type, event id.
//! - dedup key, without one: tag `adsmetrics/key/v1/content`, then the canonical content below.
//! - content hash: tag `adsmetrics/content/v1`, then event id (optional), event type, event time,
//!   ad, campaign, advertiser, country, user, ip, cost (optional), revenue (optional), producer,
//!   revision.
//!
//! Never std's hasher (not stable across releases) nor differential's `Hashable` (it changed its
//! seed in 0.26). Changing anything here is a new version (`v2`) and a migration, never an edit.

use adsmetrics_dataflows::{ContentHash, Country, DedupKey, EventType, EventVersion, Ip};
use compact_str::CompactString;
use xxhash_rust::xxh3::xxh3_128;

/// The version of the key algorithm, recorded in the raw layer and the journal.
pub const KEY_ALGORITHM: &str = "adsmetrics-key-v1";

/// Largest accepted cost or revenue of one event, in micros ($1,000,000): far beyond any real
/// event, and small enough that a cell's sum of 9.2 million such events still fits in an `i64`.
pub const MAX_AMOUNT_MICROS: i64 = 1_000_000_000_000;

/// One decoded, validated source record.
///
/// Its strings are [`CompactString`]s: up to 24 bytes (IPv4 addresses, producer names, most
/// event ids) are stored inline, so decoding an event usually allocates nothing. Three heap
/// strings per event were 8% of a batch ingest's time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Producer-assigned id; `None` when the producer sent none.
    pub event_id: Option<CompactString>,
    /// Impression, click or conversion.
    pub event_type: EventType,
    /// UTC microseconds since the Unix epoch.
    pub event_time_us: i64,
    /// The ad.
    pub ad_id: i64,
    /// The ad's campaign.
    pub campaign_id: i64,
    /// The campaign's advertiser.
    pub advertiser_id: i64,
    /// ISO 3166 alpha-2.
    pub country: Country,
    /// The viewer.
    pub user_id: i64,
    /// The viewer's IP address, as sent (validated to parse as IPv4 or IPv6).
    pub ip: CompactString,
    /// Cost in micros, non-negative; `None` is a null.
    pub cost_micros: Option<i64>,
    /// Revenue in micros, non-negative; `None` is a null.
    pub revenue_micros: Option<i64>,
    /// Who sent it (web, ios, android, server or another short name).
    pub producer: CompactString,
    /// Upstream correction counter; 0 when absent.
    pub revision: u32,
}

/// The canonical encoding of the fields a hash covers, written into a reused buffer.
struct Canonical<'a>(&'a mut Vec<u8>);

thread_local! {
    /// One encoding buffer per thread: every event is hashed twice, and two fresh allocations per
    /// event cost about as much as the hashing of a short event. It never shrinks, and needs not:
    /// the decoder's limits on every string bound an encoding to well under a kilobyte.
    static CANONICAL_BUFFER: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(Vec::with_capacity(256));
}

/// XXH3-128 of `tag` followed by what `fill` encodes.
fn canonical_hash(tag: &str, fill: impl FnOnce(&mut Canonical)) -> u128 {
    CANONICAL_BUFFER.with_borrow_mut(|buffer| {
        buffer.clear();
        let mut c = Canonical(buffer);
        c.str(tag);
        fill(&mut c);
        xxh3_128(c.0)
    })
}

impl Canonical<'_> {
    fn str(&mut self, s: &str) {
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn opt_i64(&mut self, v: Option<i64>) {
        match v {
            Some(v) => {
                self.0.push(1);
                self.i64(v);
            }
            None => self.0.push(0),
        }
    }
    fn opt_str(&mut self, v: Option<&str>) {
        match v {
            Some(v) => {
                self.0.push(1);
                self.str(v);
            }
            None => self.0.push(0),
        }
    }
}

/// An event's fields, borrowed: what its keys and version are computed from, by [`Event`] and by
/// readers that never build one (rehydration reads the raw layer's columns straight into this).
#[derive(Clone, Copy, Debug)]
pub struct EventView<'a> {
    /// See [`Event::event_id`].
    pub event_id: Option<&'a str>,
    /// See [`Event::event_type`].
    pub event_type: EventType,
    /// See [`Event::event_time_us`].
    pub event_time_us: i64,
    /// See [`Event::ad_id`].
    pub ad_id: i64,
    /// See [`Event::campaign_id`].
    pub campaign_id: i64,
    /// See [`Event::advertiser_id`].
    pub advertiser_id: i64,
    /// See [`Event::country`].
    pub country: Country,
    /// See [`Event::user_id`].
    pub user_id: i64,
    /// See [`Event::ip`].
    pub ip: &'a str,
    /// See [`Event::cost_micros`].
    pub cost_micros: Option<i64>,
    /// See [`Event::revenue_micros`].
    pub revenue_micros: Option<i64>,
    /// See [`Event::producer`].
    pub producer: &'a str,
    /// See [`Event::revision`].
    pub revision: u32,
}

impl EventView<'_> {
    fn content(&self, c: &mut Canonical) {
        c.opt_str(self.event_id);
        c.str(self.event_type.as_str());
        c.i64(self.event_time_us);
        c.i64(self.ad_id);
        c.i64(self.campaign_id);
        c.i64(self.advertiser_id);
        c.str(self.country.as_str());
        c.i64(self.user_id);
        c.str(self.ip);
        c.opt_i64(self.cost_micros);
        c.opt_i64(self.revenue_micros);
        c.str(self.producer);
        c.i64(self.revision as i64);
    }

    /// The stable dedup key (`adsmetrics-key-v1`).
    pub fn dedup_key(&self) -> DedupKey {
        let hash = match self.event_id {
            Some(id) => canonical_hash("adsmetrics/key/v1/id", |c| {
                c.str(self.producer);
                c.str(self.event_type.as_str());
                c.str(id);
            }),
            None => canonical_hash("adsmetrics/key/v1/content", |c| self.content(c)),
        };
        DedupKey(hash.into())
    }

    /// The stable hash of every field (`adsmetrics-key-v1`).
    pub fn content_hash(&self) -> ContentHash {
        ContentHash(canonical_hash("adsmetrics/content/v1", |c| self.content(c)).into())
    }

    /// What the dataflow needs of this event besides its key: its compact version.
    pub fn version(&self) -> EventVersion {
        EventVersion {
            revision: self.revision,
            content_hash: self.content_hash(),
            event_type: self.event_type,
            event_time_us: self.event_time_us,
            advertiser_id: self.advertiser_id,
            campaign_id: self.campaign_id,
            ad_id: self.ad_id,
            country: self.country,
            user_id: self.user_id,
            // Only a click's address is a dimension (of `ads_clicks_minute`): parsed for clicks
            // alone. Validated at decode; one that does not parse is `::`, never an error here.
            ip: match self.event_type {
                EventType::Click => Ip::parse(self.ip).unwrap_or_default(),
                _ => Ip::default(),
            },
            cost_micros: self.cost_micros.unwrap_or(0),
            revenue_micros: self.revenue_micros.unwrap_or(0),
        }
    }
}

impl Event {
    /// Its fields, borrowed.
    pub fn view(&self) -> EventView<'_> {
        EventView {
            event_id: self.event_id.as_deref(),
            event_type: self.event_type,
            event_time_us: self.event_time_us,
            ad_id: self.ad_id,
            campaign_id: self.campaign_id,
            advertiser_id: self.advertiser_id,
            country: self.country,
            user_id: self.user_id,
            ip: &self.ip,
            cost_micros: self.cost_micros,
            revenue_micros: self.revenue_micros,
            producer: &self.producer,
            revision: self.revision,
        }
    }

    /// The stable dedup key (`adsmetrics-key-v1`).
    pub fn dedup_key(&self) -> DedupKey {
        self.view().dedup_key()
    }

    /// The stable hash of every field (`adsmetrics-key-v1`).
    pub fn content_hash(&self) -> ContentHash {
        self.view().content_hash()
    }

    /// What the dataflow needs of this event: its key and its compact version.
    pub fn keyed_version(&self) -> (DedupKey, EventVersion) {
        let view = self.view();
        (view.dedup_key(), view.version())
    }
}

/// Input that did not decode to a valid event, kept with the reason. Nothing is dropped silently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    /// The source it came from (file path relative to the ingest root, or a topic/partition/offset).
    pub source: String,
    /// Where in the source: `line 17`, `row 3`, or `file` when the whole source is rejected.
    pub position: String,
    /// The offending bytes: the line, the row rendered as JSON, or the file (possibly truncated).
    pub raw: Vec<u8>,
    /// Why it was rejected, for a person to read.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            event_id: Some("e-1".into()),
            event_type: EventType::Click,
            event_time_us: 1_700_000_000_000_000,
            ad_id: 7,
            campaign_id: 3,
            advertiser_id: 1,
            country: Country(*b"DE"),
            user_id: 42,
            ip: "10.0.0.1".into(),
            cost_micros: Some(1500),
            revenue_micros: None,
            producer: "web".into(),
            revision: 0,
        }
    }

    #[test]
    fn keys_are_pinned() {
        // These values are the persisted format: if this test fails, the algorithm changed and
        // every raw layer written before is keyed differently. Make a v2 instead.
        let e = event();
        assert_eq!(format!("{:x}", e.dedup_key().0), PINNED_KEY);
        assert_eq!(format!("{:x}", e.content_hash().0), PINNED_CONTENT);
    }
    const PINNED_KEY: &str = "180f1175069bac9174ecd22e7f7ea031";
    const PINNED_CONTENT: &str = "390c367cc795cedbee23eca0b4113a37";

    #[test]
    fn id_key_ignores_content_but_content_hash_does_not() {
        let a = event();
        let mut b = event();
        b.cost_micros = Some(9);
        b.revision = 1;
        assert_eq!(a.dedup_key(), b.dedup_key());
        assert_ne!(a.content_hash(), b.content_hash());
        let mut c = event();
        c.producer = "ios".into();
        assert_ne!(a.dedup_key(), c.dedup_key());
    }

    #[test]
    fn missing_id_keys_by_content() {
        let mut a = event();
        a.event_id = None;
        let mut b = a.clone();
        assert_eq!(a.dedup_key(), b.dedup_key());
        b.user_id += 1;
        assert_ne!(a.dedup_key(), b.dedup_key());
    }
}
