//! IMDSv2 session tokens issued by the agent itself, bound to the calling pod's address.
//!
//! Stateless: `base64url(expiry ‖ address ‖ HMAC-SHA256(key, expiry ‖ address)[..16])` with a
//! key drawn at start-up, so no number of PUTs grows memory. Tokens of a previous agent process
//! are rejected (401), and clients fetch a new one, as they do when IMDS tokens expire.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::identity::key;

/// IMDS accepts TTLs from 1 s to 6 h.
pub const MAX_TTL: u64 = 21_600;
const TAG_LEN: usize = 16;

pub struct TokenIssuer {
    key: [u8; 32],
}

/// Why a token is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    Malformed,
    Forged,
    Expired,
    OtherCaller,
}

impl TokenIssuer {
    pub fn new(key: [u8; 32]) -> Self {
        TokenIssuer { key }
    }

    /// A key from the kernel's CSPRNG.
    pub fn random() -> std::io::Result<Self> {
        let mut key = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)?;
        Ok(TokenIssuer { key })
    }

    fn tag(&self, body: &[u8]) -> [u8; TAG_LEN] {
        // HMAC accepts keys of any length; 32 bytes cannot fail.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(body);
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    pub fn issue(&self, caller: IpAddr, ttl: Duration, now: SystemTime) -> String {
        let expiry = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            + ttl.as_secs();
        let mut body = Vec::with_capacity(8 + 16 + TAG_LEN);
        body.extend_from_slice(&expiry.to_be_bytes());
        body.extend_from_slice(&key(caller));
        let tag = self.tag(&body);
        body.extend_from_slice(&tag);
        URL_SAFE_NO_PAD.encode(body)
    }

    pub fn check(&self, token: &str, caller: IpAddr, now: SystemTime) -> Result<(), Invalid> {
        let raw = URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| Invalid::Malformed)?;
        if raw.len() != 8 + 16 + TAG_LEN {
            return Err(Invalid::Malformed);
        }
        let (body, tag) = raw.split_at(24);
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(body);
        mac.verify_truncated_left(tag)
            .map_err(|_| Invalid::Forged)?;
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&body[..8]);
        let expiry = u64::from_be_bytes(expiry);
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if now >= expiry {
            return Err(Invalid::Expired);
        }
        if body[8..24] != key(caller) {
            return Err(Invalid::OtherCaller);
        }
        Ok(())
    }
}

/// Parses `X-aws-ec2-metadata-token-ttl-seconds`.
pub fn parse_ttl(value: Option<&str>) -> Result<Duration, String> {
    let value = value.ok_or("missing X-aws-ec2-metadata-token-ttl-seconds")?;
    match value.trim().parse::<u64>() {
        Ok(ttl) if (1..=MAX_TTL).contains(&ttl) => Ok(Duration::from_secs(ttl)),
        _ => Err(format!(
            "X-aws-ec2-metadata-token-ttl-seconds must be 1 to {MAX_TTL}, got {value:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bound_to_caller_and_time() {
        let issuer = TokenIssuer::new([7; 32]);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let token = issuer.issue(a, Duration::from_secs(60), now);
        assert_eq!(issuer.check(&token, a, now), Ok(()));
        assert_eq!(issuer.check(&token, b, now), Err(Invalid::OtherCaller));
        assert_eq!(
            issuer.check(&token, a, now + Duration::from_secs(60)),
            Err(Invalid::Expired)
        );
        let other_agent = TokenIssuer::new([8; 32]);
        assert_eq!(other_agent.check(&token, a, now), Err(Invalid::Forged));
        assert_eq!(issuer.check("garbage", a, now), Err(Invalid::Malformed));
        let mut tampered = URL_SAFE_NO_PAD.decode(&token).unwrap();
        tampered[0] ^= 1;
        assert_eq!(
            issuer.check(&URL_SAFE_NO_PAD.encode(tampered), a, now),
            Err(Invalid::Forged)
        );
    }

    #[test]
    fn ttl_bounds() {
        assert_eq!(parse_ttl(Some("21600")), Ok(Duration::from_secs(21600)));
        assert_eq!(parse_ttl(Some("1")), Ok(Duration::from_secs(1)));
        for bad in [Some("0"), Some("21601"), Some("-1"), Some("abc"), None] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }
}
