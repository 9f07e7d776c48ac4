//! The values that flow through the dataflows: dedup keys, event versions, metric cells and rows.
//!
//! Everything here is plain data with a total order, so the dataflows can sort it and the sink can
//! write it in a fixed order. Nothing here hashes with std's hasher: the 128-bit keys are computed
//! outside this crate by a documented, versioned algorithm and only carried here.

use serde::{Deserialize, Serialize};

/// The dataflow's logical time: one per ingest batch. Event time is data, never time.
pub type Epoch = u64;

/// Microseconds in one minute.
pub const MICROS_PER_MINUTE: i64 = 60_000_000;
/// Microseconds in one hour.
pub const MICROS_PER_HOUR: i64 = 3_600_000_000;
/// Microseconds in one day.
pub const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

/// A 128-bit hash stored as two `u64` halves (high first, so the order is the `u128` order).
///
/// Not a `u128`: that is 16-byte aligned, which pads every record the dataflow sorts by 8–16
/// bytes, and the sort is most of the dataflow's cost.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct Hash128([u64; 2]);

impl Hash128 {
    /// The hash as a `u128`.
    pub fn get(self) -> u128 {
        ((self.0[0] as u128) << 64) | self.0[1] as u128
    }
}

impl From<u128> for Hash128 {
    fn from(v: u128) -> Self {
        Hash128([(v >> 64) as u64, v as u64])
    }
}

impl std::fmt::LowerHex for Hash128 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}{:016x}", self.0[0], self.0[1])
    }
}

/// Stable 128-bit identity of one source event (the root crate's `event` module documents the
/// algorithm).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct DedupKey(pub Hash128);

/// Stable 128-bit hash of one event's canonical content; breaks ties between versions of a key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct ContentHash(pub Hash128);

/// What happened: the three kinds of ads event.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum EventType {
    /// The ad was delivered and shown.
    Impression,
    /// The ad was clicked.
    Click,
    /// The click led to a conversion.
    Conversion,
}

impl EventType {
    /// The name used in every file format.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Impression => "impression",
            EventType::Click => "click",
            EventType::Conversion => "conversion",
        }
    }

    /// Parses the file-format name; `None` for anything else (case-sensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "impression" => Some(EventType::Impression),
            "click" => Some(EventType::Click),
            "conversion" => Some(EventType::Conversion),
            _ => None,
        }
    }
}

/// An ISO 3166 alpha-2 country code: exactly two ASCII upper-case letters.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct Country(pub [u8; 2]);

impl Country {
    /// Accepts exactly two ASCII letters `A`–`Z`; anything else (`../x`, `usa`, `u1`) is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.as_bytes() {
            [a, b] if a.is_ascii_uppercase() && b.is_ascii_uppercase() => Some(Country([*a, *b])),
            _ => None,
        }
    }

    /// The two letters as a `&str`.
    pub fn as_str(&self) -> &str {
        // Only ever built from two ASCII letters, so this cannot fail.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

/// An IP address as 16 bytes: IPv6 as it is, IPv4 as its IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`). Fixed size and ordered, so it can be a dimension; all zeros (`::`) when
/// unknown.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
pub struct Ip(pub [u8; 16]);

impl Ip {
    /// Parses an IPv4 or IPv6 address in any textual form `std::net` accepts.
    pub fn parse(s: &str) -> Option<Self> {
        let ip: std::net::IpAddr = s.parse().ok()?;
        Some(Ip(match ip {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(v6) => v6.octets(),
        }))
    }
}

impl std::fmt::Display for Ip {
    /// The canonical text: dotted IPv4 for a mapped address, RFC 5952 IPv6 otherwise.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v6 = std::net::Ipv6Addr::from(self.0);
        match v6.to_ipv4_mapped() {
            Some(v4) => write!(f, "{v4}"),
            None => write!(f, "{v6}"),
        }
    }
}

/// The extra dimensions of a click in `ads_clicks_minute`: its minute within the hour, and the
/// viewer's IP address and user (the query API filters on them). All zero in the hourly, daily and
/// weekly tables.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
pub struct ClickDims {
    /// Minute of the hour, 0–59.
    pub minute: u8,
    /// The viewer's IP address.
    pub ip: Ip,
    /// The viewer.
    pub user_id: i64,
}

/// The dimensions of the hourly, daily and weekly tables: [`Dims`] without a click's. The
/// dataflow adds its cells up under these (32 bytes, where [`Dims`] takes 64), and widens them
/// only when it hands the sums on.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct AdDims {
    /// Advertiser that pays.
    pub advertiser_id: i64,
    /// Campaign of the ad.
    pub campaign_id: i64,
    /// The ad itself.
    pub ad_id: i64,
    /// Country of the viewer.
    pub country: Country,
}

impl AdDims {
    /// As a table's dimensions, with no click's.
    pub fn widen(self) -> Dims {
        Dims {
            advertiser_id: self.advertiser_id,
            campaign_id: self.campaign_id,
            ad_id: self.ad_id,
            country: self.country,
            click: ClickDims::default(),
        }
    }
}

/// The dimensions every metrics table groups by, besides its time period.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct Dims {
    /// Advertiser that pays.
    pub advertiser_id: i64,
    /// Campaign of the ad.
    pub campaign_id: i64,
    /// The ad itself.
    pub ad_id: i64,
    /// Country of the viewer.
    pub country: Country,
    /// Minute, IP and user: only in `ads_clicks_minute` (else zero).
    pub click: ClickDims,
}

/// One version of one event, reduced to what the metrics need. Fixed size, no heap.
///
/// The dimensions are fields of their own rather than a [`Dims`]: nested, the country's two bytes
/// would pad a word of their own, and this is the record the dedup arrangement sorts (80 bytes
/// flat, 88 nested).
///
/// The derived order starts with `revision`, then `content_hash`: the greatest version of a key is
/// the one that wins a conflict, whatever order the versions arrived in.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct EventVersion {
    /// Upstream correction counter; the highest wins.
    pub revision: u32,
    /// Tie-break between versions with the same revision.
    pub content_hash: ContentHash,
    /// Impression, click or conversion.
    pub event_type: EventType,
    /// Event time, UTC microseconds since the Unix epoch.
    pub event_time_us: i64,
    /// Advertiser that pays (a dimension; see [`EventVersion::dims`]).
    pub advertiser_id: i64,
    /// Campaign of the ad (a dimension).
    pub campaign_id: i64,
    /// The ad itself (a dimension).
    pub ad_id: i64,
    /// Country of the viewer (a dimension).
    pub country: Country,
    /// The viewer, for exact unique-user counts.
    pub user_id: i64,
    /// The viewer's IP address: a dimension of `ads_clicks_minute` only, so set for clicks only
    /// (`::` otherwise).
    pub ip: Ip,
    /// Cost in micros; a null cost is 0 here.
    pub cost_micros: i64,
    /// Revenue in micros; a null revenue is 0 here.
    pub revenue_micros: i64,
}

impl EventVersion {
    /// The dimensions the event is counted under.
    pub fn dims(&self) -> Dims {
        self.ad_dims().widen()
    }

    /// The dimensions the event is counted under in the hourly, daily and weekly tables.
    pub fn ad_dims(&self) -> AdDims {
        AdDims {
            advertiser_id: self.advertiser_id,
            campaign_id: self.campaign_id,
            ad_id: self.ad_id,
            country: self.country,
        }
    }

    /// The dimensions of the event in `ads_clicks_minute`: [`EventVersion::dims`] and its minute,
    /// IP and user.
    pub fn click_dims(&self) -> Dims {
        Dims {
            click: ClickDims {
                minute: self
                    .event_time_us
                    .div_euclid(MICROS_PER_MINUTE)
                    .rem_euclid(60) as u8,
                ip: self.ip,
                user_id: self.user_id,
            },
            ..self.dims()
        }
    }

    /// The event's hour: whole hours since the Unix epoch (floor, so negative times work too).
    pub fn hour(&self) -> i64 {
        self.event_time_us.div_euclid(MICROS_PER_HOUR)
    }

    /// The event's day: whole days since the Unix epoch.
    pub fn day(&self) -> i64 {
        self.event_time_us.div_euclid(MICROS_PER_DAY)
    }
}

/// The granularity of a metrics table.
///
/// A grain's *period* is its partition: an hour, a day, or (for `ads_clicks_minute`, whose cells
/// carry their minute in [`ClickDims`]) an hour again, so a late click rewrites one hour's file
/// and not sixty.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum Grain {
    /// `ads_metrics_hourly`: period = hours since the Unix epoch.
    Hourly,
    /// `ads_metrics_daily`: period = days since the Unix epoch.
    Daily,
    /// `ads_clicks_minute`: clicks only, per minute, ad, country, IP and user; period = hours
    /// since the Unix epoch.
    Minute,
    /// `ads_metrics_weekly`: ISO weeks (Monday to Sunday, UTC); period = [`week_of_day`] of its
    /// days. Sums only: a week's distinct users are not a sum of its days'.
    Weekly,
}

/// The ISO week (Monday-based, since the week of the Unix epoch) a day falls in.
pub fn week_of_day(day: i64) -> i64 {
    // 1970-01-01 was a Thursday: day −3 is the Monday that starts week 0.
    (day + 3).div_euclid(7)
}

/// The first day (a Monday) of a week.
pub fn first_day_of_week(week: i64) -> i64 {
    week * 7 - 3
}

impl Grain {
    /// Every grain, in publish order.
    pub const ALL: [Grain; 4] = [Grain::Hourly, Grain::Daily, Grain::Minute, Grain::Weekly];

    /// The period (the partition: hour or day index) an event falls into.
    pub fn period_of(self, event: &EventVersion) -> i64 {
        match self {
            Grain::Hourly | Grain::Minute => event.hour(),
            Grain::Daily => event.day(),
            Grain::Weekly => week_of_day(event.day()),
        }
    }

    /// Whether `event` counts in this grain's table: every event does, but only clicks count in
    /// `ads_clicks_minute`.
    pub fn counts(self, event: &EventVersion) -> bool {
        self != Grain::Minute || event.event_type == EventType::Click
    }

    /// The dimensions `event` counts under in this grain's table.
    pub fn dims_of(self, event: &EventVersion) -> Dims {
        match self {
            Grain::Minute => event.click_dims(),
            Grain::Hourly | Grain::Daily | Grain::Weekly => event.dims(),
        }
    }

    /// Whether the table's partitions are hours (`dt=…/hr=…`) rather than days (`dt=…`) or
    /// weeks (`week=…`).
    pub fn by_hour(self) -> bool {
        matches!(self, Grain::Hourly | Grain::Minute)
    }

    /// Whether the table carries `unique_users`. In `ads_clicks_minute` the user is a dimension,
    /// so each row is one user and the column would say nothing; a week's would need the week's
    /// users in the dataflow at once, which the hot window (by days) does not hold.
    pub fn has_unique_users(self) -> bool {
        matches!(self, Grain::Hourly | Grain::Daily)
    }
}

/// One output cell: a period of one grain and its dimensions. The period is also the partition.
/// `Cell<AdDims>`: a cell of the hourly, daily or weekly table as the dataflow adds it up.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct Cell<D = Dims> {
    /// Its table.
    pub grain: Grain,
    /// Hour, day or week index since the Unix epoch; one curated partition per (grain, period).
    pub period: i64,
    /// The group within the partition.
    pub dims: D,
}

impl Cell<AdDims> {
    /// As a table's cell (no click dimensions).
    pub fn widen(self) -> Cell {
        Cell {
            grain: self.grain,
            period: self.period,
            dims: self.dims.widen(),
        }
    }
}

/// The metrics of one cell. Sums are exact; `unique_users` is an exact distinct count.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
pub struct MetricRow {
    /// Number of distinct impression events.
    pub impressions: i64,
    /// Number of distinct click events.
    pub clicks: i64,
    /// Number of distinct conversion events.
    pub conversions: i64,
    /// Sum of cost over distinct events.
    pub cost_micros: i64,
    /// Sum of revenue over distinct events.
    pub revenue_micros: i64,
    /// Number of distinct `user_id`s among the cell's events.
    pub unique_users: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weeks_start_on_monday() {
        // 1970-01-01 was a Thursday; 1969-12-29 a Monday; 2026-11-02 (day 20759) a Monday.
        assert_eq!(week_of_day(0), 0);
        assert_eq!(week_of_day(-3), 0);
        assert_eq!(week_of_day(-4), -1);
        assert_eq!(week_of_day(4), 1);
        let week = week_of_day(20759);
        assert_eq!(first_day_of_week(week), 20759);
        assert_eq!(week_of_day(20759 + 6), week);
        assert_eq!(week_of_day(20759 - 1), week - 1);
    }

    #[test]
    fn ip_addresses_compare_as_addresses_and_print_canonically() {
        assert_eq!(Ip::parse("2001:DB8:0:0::2"), Ip::parse("2001:db8::2"));
        assert_eq!(Ip::parse("192.0.2.7").unwrap().to_string(), "192.0.2.7");
        assert_eq!(
            Ip::parse("2001:DB8:0::2").unwrap().to_string(),
            "2001:db8::2"
        );
        assert_ne!(Ip::parse("::ffff:192.0.2.7"), Ip::parse("192.0.2.8"));
        assert!(Ip::parse("192.0.2").is_none());
    }
}
