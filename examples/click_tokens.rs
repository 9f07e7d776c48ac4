//! Signed impression tokens for a load run against `adsmetrics serve`: one per line on stdout,
//! each a distinct impression of one of `--ads` ads (so every click is new to the server's
//! front-line dedup and goes through the spool), valid for a day. See `scripts/click-load`.
//!
//! ```text
//! cargo run --release --example click_tokens -- --keys keys.json --count 200000 --ads 100000
//! ```

use std::io::Write as _;
use std::path::PathBuf;

use adsmetrics::token::{Claims, Keyring};
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// The keyring file (`adsmetrics serve --keys`).
    #[arg(long)]
    keys: PathBuf,
    /// Tokens to print.
    #[arg(long, default_value_t = 200_000)]
    count: u64,
    /// Distinct ads the impressions are spread over.
    #[arg(long, default_value_t = 100_000)]
    ads: i64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let keyring = Keyring::load(&args.keys)?;
    let now = chrono::Utc::now().timestamp();
    let countries = ["US", "DE", "FR", "GB", "JP", "BR", "IN", "CA"];
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for i in 0..args.count {
        let ad_id = (i as i64 * 7919) % args.ads.max(1) + 1;
        let claims = Claims {
            impression_id: format!("load-{now}-{i}"),
            ad_id,
            campaign_id: ad_id / 10 + 1,
            advertiser_id: ad_id / 100 + 1,
            target_url: format!(
                "https://advertiser-{}.example/landing?ad={ad_id}",
                ad_id / 100 + 1
            ),
            user_id: (i as i64 * 104_729) % 1_000_000,
            country: countries[(i % countries.len() as u64) as usize].to_string(),
            cost_micros: Some(100_000),
            issued_at: now,
            expires_at: now + 86_400,
        };
        let token = keyring
            .sign(&claims)
            .map_err(|e| anyhow::anyhow!("cannot sign: {e}"))?;
        writeln!(out, "{token}")?;
    }
    Ok(())
}
