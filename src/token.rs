//! Impression tokens: what the ad server signs when it shows an ad, and what `GET /click` verifies
//! before it counts a click and redirects.
//!
//! ```text
//!  v1.<key id>.<claims>.<signature>
//!     claims:    base64url (no padding) of the JSON of [`Claims`]
//!     signature: base64url of HMAC-SHA256(secret of <key id>, "v1.<key id>.<claims>")
//! ```
//!
//! The claims carry everything the click event needs that a client must not choose: the
//! impression (its id is the click's stable event id, so double clicks and retries dedup), the
//! ad, campaign and advertiser, the viewer and country, and the target URL, which is the only
//! place the redirect ever goes (no open redirect). A token is valid from its issue time (a
//! minute of clock skew allowed) to its expiry.
//!
//! Keys rotate through a [`Keyring`] file: several active keys verify, one signs. A new key is
//! added and made the signing one while the old stays active, so tokens already out keep working;
//! once they have expired, the old key is marked retired (or removed) and its tokens fail. The
//! signature is compared in constant time (`hmac`'s `verify_slice`).

use std::collections::BTreeMap;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The format's version, the token's first field.
const VERSION: &str = "v1";

/// How far in the future a token's issue time may be (the ad server's clock ahead of ours).
pub const CLOCK_SKEW_SECS: i64 = 60;

/// Longest token accepted, bytes: far above any real one, and a bound on what a request makes
/// the server decode.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// What a token vouches for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The impression (the ad shown): the click's event id.
    pub impression_id: String,
    /// The ad.
    pub ad_id: i64,
    /// The ad's campaign.
    pub campaign_id: i64,
    /// The campaign's advertiser.
    pub advertiser_id: i64,
    /// Where the click goes: an absolute `http` or `https` URL.
    pub target_url: String,
    /// The viewer the ad was shown to.
    pub user_id: i64,
    /// The viewer's country, ISO 3166 alpha-2.
    pub country: String,
    /// What the click costs the advertiser, micros, if priced per click.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_micros: Option<i64>,
    /// Issued at, Unix seconds.
    pub issued_at: i64,
    /// Expires at, Unix seconds (valid while `now < expires_at`).
    pub expires_at: i64,
}

impl Claims {
    /// Whether these claims could become a valid click: the reason if not.
    pub fn check(&self) -> Result<(), String> {
        if self.impression_id.is_empty()
            || self.impression_id.len() > 128
            || !self
                .impression_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
        {
            return Err(
                "impression_id must be 1 to 128 letters, digits, '.', '_', ':' or '-'".into(),
            );
        }
        check_target(&self.target_url)?;
        let country = self.country.as_bytes();
        if country.len() != 2 || !country.iter().all(u8::is_ascii_uppercase) {
            return Err(format!(
                "country {:?} is not two upper-case letters",
                self.country
            ));
        }
        if self
            .cost_micros
            .is_some_and(|c| !(0..=crate::event::MAX_AMOUNT_MICROS).contains(&c))
        {
            return Err("cost_micros is out of range".into());
        }
        if self.expires_at <= self.issued_at {
            return Err("expires_at is not after issued_at".into());
        }
        Ok(())
    }
}

/// An absolute `http`/`https` URL with a host and nothing a header or a browser would read
/// differently (no whitespace, control characters or backslashes).
fn check_target(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("target_url {url:?} is not an absolute http(s) URL"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || host.starts_with('@') {
        return Err(format!("target_url {url:?} has no host"));
    }
    if url.len() > 2048
        || url
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '\\')
    {
        return Err(format!(
            "target_url {url:?} is too long or holds whitespace, control characters or backslashes"
        ));
    }
    Ok(())
}

/// Why a token was refused (each a counted reason, answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of this format.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// Signed with a key this server does not know.
    #[error("unknown key id {0:?}")]
    UnknownKey(String),
    /// Signed with a key that has been retired.
    #[error("key id {0:?} is retired")]
    RetiredKey(String),
    /// The signature does not match (forged or tampered).
    #[error("bad signature")]
    BadSignature,
    /// Past its expiry.
    #[error("token expired at {0}")]
    Expired(i64),
    /// Issued in the future, beyond the allowed clock skew.
    #[error("token issued in the future ({0})")]
    NotYetValid(i64),
    /// Signed, but its claims are not a valid click.
    #[error("invalid claims: {0}")]
    InvalidClaims(String),
}

impl TokenError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "malformed",
            TokenError::UnknownKey(_) => "unknown_key",
            TokenError::RetiredKey(_) => "retired_key",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired(_) => "expired",
            TokenError::NotYetValid(_) => "not_yet_valid",
            TokenError::InvalidClaims(_) => "invalid_claims",
        }
    }
}

/// One key of a keyring file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyEntry {
    /// Its id: letters, digits, `-` and `_`.
    pub id: String,
    /// The secret, hex (at least 32 bytes).
    pub secret_hex: String,
    /// Retired keys verify nothing: their tokens are refused.
    #[serde(default)]
    pub retired: bool,
}

/// A keyring file: `{"signing": "<id>", "keys": [{"id": …, "secret_hex": …, "retired": false}]}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyringFile {
    /// The key new tokens are signed with (must be active).
    pub signing: String,
    /// Every key, active and retired.
    pub keys: Vec<KeyEntry>,
}

/// The keys a server verifies with and signs with.
#[derive(Clone)]
pub struct Keyring {
    signing: String,
    keys: BTreeMap<String, (Vec<u8>, bool)>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.debug_struct("Keyring")
            .field("signing", &self.signing)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// A keyring from its file's contents; the reason if they are not a usable keyring.
    pub fn from_file(file: &KeyringFile) -> Result<Self, String> {
        let mut keys = BTreeMap::new();
        for key in &file.keys {
            if key.id.is_empty()
                || !key
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(format!(
                    "key id {:?}: use letters, digits, '-' and '_'",
                    key.id
                ));
            }
            let secret = decode_hex(&key.secret_hex)
                .ok_or_else(|| format!("key {:?}: secret_hex is not hex", key.id))?;
            if secret.len() < 32 {
                return Err(format!(
                    "key {:?}: the secret is {} bytes, at least 32 are needed",
                    key.id,
                    secret.len()
                ));
            }
            if keys.insert(key.id.clone(), (secret, key.retired)).is_some() {
                return Err(format!("key id {:?} appears twice", key.id));
            }
        }
        match keys.get(&file.signing) {
            None => return Err(format!("the signing key {:?} is not in keys", file.signing)),
            Some((_, true)) => {
                return Err(format!("the signing key {:?} is retired", file.signing))
            }
            Some(_) => {}
        }
        Ok(Keyring {
            signing: file.signing.clone(),
            keys,
        })
    }

    /// Reads a keyring file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the keyring {}", path.display()))?;
        let file: KeyringFile = serde_json::from_str(&text)
            .with_context(|| format!("the keyring {} is not valid JSON", path.display()))?;
        Self::from_file(&file).map_err(|e| anyhow::anyhow!("the keyring {}: {e}", path.display()))
    }

    /// A token for `claims`, signed with the signing key.
    pub fn sign(&self, claims: &Claims) -> Result<String, String> {
        claims.check()?;
        let (secret, _) = &self.keys[&self.signing];
        let payload =
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).map_err(|e| e.to_string())?);
        let signed = format!("{VERSION}.{}.{payload}", self.signing);
        let mut mac = mac(secret);
        mac.update(signed.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        Ok(format!("{signed}.{signature}"))
    }

    /// The claims of `token` if it is signed by an active key, unexpired at `now` (Unix
    /// seconds) and a valid click.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed("too long".into()));
        }
        let mut parts = token.split('.');
        let (Some(version), Some(key_id), Some(payload), Some(signature), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed(
                "not four dot-separated fields".into(),
            ));
        };
        if version != VERSION {
            return Err(TokenError::Malformed(format!(
                "unknown version {version:?}"
            )));
        }
        let (secret, retired) = self
            .keys
            .get(key_id)
            .ok_or_else(|| TokenError::UnknownKey(key_id.chars().take(64).collect()))?;
        if *retired {
            return Err(TokenError::RetiredKey(key_id.to_string()));
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed("the signature is not base64url".into()))?;
        let mut mac = mac(secret);
        // The signed part: everything before the last dot.
        let signed = version.len() + key_id.len() + payload.len() + 2;
        mac.update(&token.as_bytes()[..signed]);
        mac.verify_slice(&signature)
            .map_err(|_| TokenError::BadSignature)?;
        // Only signed bytes are decoded.
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed("the claims are not base64url".into()))?;
        let claims: Claims = serde_json::from_slice(&json)
            .map_err(|e| TokenError::Malformed(format!("the claims are not valid: {e}")))?;
        if now >= claims.expires_at {
            return Err(TokenError::Expired(claims.expires_at));
        }
        if claims.issued_at > now + CLOCK_SKEW_SECS {
            return Err(TokenError::NotYetValid(claims.issued_at));
        }
        claims.check().map_err(TokenError::InvalidClaims)?;
        Ok(claims)
    }
}

/// An HMAC-SHA256 keyed with `secret`.
fn mac(secret: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length")
}

/// A new random secret, hex: 32 bytes of a cryptographically secure generator.
pub fn new_secret_hex() -> String {
    use rand::Rng as _;
    let mut bytes = [0u8; 32];
    // ThreadRng: a cryptographically secure generator seeded from the operating system.
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    let hex = hex.trim();
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring(signing: &str, keys: &[(&str, u8, bool)]) -> Keyring {
        Keyring::from_file(&KeyringFile {
            signing: signing.into(),
            keys: keys
                .iter()
                .map(|(id, fill, retired)| KeyEntry {
                    id: id.to_string(),
                    secret_hex: format!("{fill:02x}").repeat(32),
                    retired: *retired,
                })
                .collect(),
        })
        .unwrap()
    }

    fn claims() -> Claims {
        Claims {
            impression_id: "imp-1".into(),
            ad_id: 7,
            campaign_id: 3,
            advertiser_id: 1,
            target_url: "https://shop.example/landing?a=1".into(),
            user_id: 42,
            country: "DE".into(),
            cost_micros: Some(250_000),
            issued_at: 1_000,
            expires_at: 4_600,
        }
    }

    #[test]
    fn a_signed_token_verifies_until_it_expires() {
        let ring = keyring("k1", &[("k1", 1, false)]);
        let token = ring.sign(&claims()).unwrap();
        assert_eq!(ring.verify(&token, 1_000).unwrap(), claims());
        assert_eq!(ring.verify(&token, 4_599).unwrap(), claims());
        assert_eq!(ring.verify(&token, 4_600), Err(TokenError::Expired(4_600)));
        assert_eq!(
            ring.verify(&token, 1_000 - CLOCK_SKEW_SECS - 1),
            Err(TokenError::NotYetValid(1_000))
        );
    }

    #[test]
    fn any_changed_byte_fails() {
        let ring = keyring("k1", &[("k1", 1, false)]);
        let token = ring.sign(&claims()).unwrap();
        for i in 0..token.len() {
            let mut bytes = token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let Ok(changed) = String::from_utf8(bytes) else {
                continue;
            };
            if changed != token {
                assert!(ring.verify(&changed, 2_000).is_err(), "byte {i} changed");
            }
        }
        // Claims re-encoded with another target keep the old signature: refused.
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        let mut evil = claims();
        evil.target_url = "https://evil.example/".into();
        parts[2] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&evil).unwrap());
        assert_eq!(
            ring.verify(&parts.join("."), 2_000),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn a_token_of_another_key_is_forged() {
        let ours = keyring("k1", &[("k1", 1, false)]);
        let theirs = keyring("k1", &[("k1", 2, false)]);
        let forged = theirs.sign(&claims()).unwrap();
        assert_eq!(ours.verify(&forged, 2_000), Err(TokenError::BadSignature));
        let unknown = keyring("k9", &[("k9", 1, false)]).sign(&claims()).unwrap();
        assert_eq!(
            ours.verify(&unknown, 2_000),
            Err(TokenError::UnknownKey("k9".into()))
        );
    }

    #[test]
    fn rotation_keeps_old_tokens_until_their_key_is_retired() {
        let before = keyring("k1", &[("k1", 1, false)]);
        let old = before.sign(&claims()).unwrap();
        let rotated = keyring("k2", &[("k1", 1, false), ("k2", 2, false)]);
        assert!(rotated.verify(&old, 2_000).is_ok());
        let new = rotated.sign(&claims()).unwrap();
        assert!(new.starts_with("v1.k2."));
        let retired = keyring("k2", &[("k1", 1, true), ("k2", 2, false)]);
        assert_eq!(
            retired.verify(&old, 2_000),
            Err(TokenError::RetiredKey("k1".into()))
        );
        assert!(retired.verify(&new, 2_000).is_ok());
    }

    #[test]
    fn bad_targets_and_keyrings_are_refused() {
        let ring = keyring("k1", &[("k1", 1, false)]);
        for target in [
            "javascript:alert(1)",
            "//evil.example/",
            "https:///path",
            "https://@evil.example",
            "https://a.example/\r\nSet-Cookie: x",
            "ftp://a.example/",
        ] {
            let mut c = claims();
            c.target_url = target.into();
            assert!(ring.sign(&c).is_err(), "{target}");
        }
        assert!(Keyring::from_file(&KeyringFile {
            signing: "k1".into(),
            keys: vec![KeyEntry {
                id: "k1".into(),
                secret_hex: "00ff".into(),
                retired: false
            }],
        })
        .is_err());
        assert!(Keyring::from_file(&KeyringFile {
            signing: "k2".into(),
            keys: vec![],
        })
        .is_err());
        assert_eq!(new_secret_hex().len(), 64);
    }
}
