//! Rotating an endpoint's signing secret with an overlap (`webhooks-rotate-secret`).
//!
//! What must hold (docs/architecture.md, invariant 7): only the caller's endpoint is rotated
//! (another account's looks missing); the new secret of the endpoint's scheme (a `whsec_`
//! secret, or for `v1a` an ed25519 key pair whose public key is shown) leaves this module only
//! once, in the answer; both the new and the replaced secret are stored sealed like every
//! secret and never logged; the replaced one signs beside the new one until
//! `previous_secret_expires_at` (the grace period from the database's clock, at most
//! [`MAX_GRACE`]; none for a zero grace period), and a later rotation drops it; a refused
//! call changes nothing.

use std::time::Duration;

use uuid::Uuid;

use crate::admin::endpoints::{invalid, view, Caller, EndpointError, EndpointView, Endpoints};
use crate::security::secrets::{Scheme, SigningSecret};
use crate::store;

/// The grace period when the call names none.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
/// The longest grace period.
pub const MAX_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// `grace_period` as sent (absent: [`DEFAULT_GRACE`]): a whole number without leading zeros and
/// one unit, `s`, `m`, `h` or `d`, of at most `99999s`, `9999m`, `168h` or `7d` — exactly the
/// OpenAPI document's pattern, so what it describes is what is accepted.
pub fn grace_period(text: Option<&str>) -> Result<Duration, EndpointError> {
    let Some(text) = text else { return Ok(DEFAULT_GRACE) };
    let bad = || {
        invalid(
            "grace_period must be a whole number and one unit (s, m, h or d), such as \"24h\", \"90m\" or \"0s\", \
             and at most \"7d\"",
        )
    };
    // The unit is the last character, whatever its width (a multi-byte one is refused below).
    let unit_at = text.char_indices().last().map_or(0, |(i, _)| i);
    let (digits, unit) = text.split_at(unit_at);
    let well_formed =
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && (digits == "0" || !digits.starts_with('0'));
    // Most digits per unit, and the largest value (none above 7 days).
    let (max_digits, unit_secs, max_value) = match unit {
        "s" => (5, 1, 99_999),
        "m" => (4, 60, 9_999),
        "h" => (3, 3600, 168),
        "d" => (1, 86_400, 7),
        _ => return Err(bad()),
    };
    if !well_formed || digits.len() > max_digits {
        return Err(bad());
    }
    let value: u64 = digits.parse().map_err(|_| bad())?;
    if value > max_value {
        return Err(bad());
    }
    Ok(Duration::from_secs(value * unit_secs))
}

impl Endpoints {
    /// Gives one of the caller's endpoints a new secret; the replaced one keeps signing beside
    /// it for `grace`. The returned secret is the only time it is shown in full (for `v1a`
    /// only its public key is shown, in the view).
    pub async fn rotate_secret(
        &self,
        caller: Caller,
        id: Uuid,
        grace: Duration,
    ) -> Result<(EndpointView, SigningSecret), EndpointError> {
        let client = self.db().get().await?;
        let current =
            store::endpoints::get_in_account(&**client, caller.account_id, id).await?.ok_or(EndpointError::NotFound)?;
        let scheme = Scheme::parse(&current.signature_scheme).unwrap_or(Scheme::V1);
        let secret = SigningSecret::generate_for(scheme);
        let (sealed, prefix, public_key) = (self.secrets().seal(&secret, id), secret.prefix(), secret.public_key());
        let row = store::endpoints::rotate_in_account(
            &**client,
            caller.account_id,
            id,
            (&sealed, &prefix, public_key.as_deref()),
            grace,
        )
        .await?
        .ok_or(EndpointError::NotFound)?;
        Ok((view(row), secret))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_periods_default_to_a_day_and_stop_at_a_week() {
        assert_eq!(grace_period(None).unwrap(), DEFAULT_GRACE);
        assert_eq!(grace_period(Some("0s")).unwrap(), Duration::ZERO);
        assert_eq!(grace_period(Some("7d")).unwrap(), MAX_GRACE);
        assert_eq!(grace_period(Some("168h")).unwrap(), MAX_GRACE);
        assert_eq!(grace_period(Some("90m")).unwrap(), Duration::from_secs(5400));
        assert_eq!(grace_period(Some("99999s")).unwrap(), Duration::from_secs(99_999));
        for bad in [
            "8d",
            "169h",
            "100000s",
            "10000m",
            "01h",
            "1h 30m",
            "soon",
            "-1h",
            "",
            "h",
            " 1h",
            "1H",
            "1.5h",
            "5ÿ",
            "ÿ",
            "񡞀𒛺Ôèÿ",
            "1ｈ",
        ] {
            let e = grace_period(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("grace_period"), "{bad}: {e}");
        }
    }
}
