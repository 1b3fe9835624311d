//! Durations and times as users write them (`90s`, `8h`, RFC 3339), and the clock.

use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};

/// Parses a duration like "90s", "30m", "1h", "7d" (at most 100 years).
pub fn parse_ttl(s: &str) -> Result<Duration> {
    let d = humantime::parse_duration(s)
        .map_err(|e| Error::InvalidArgument(format!("duration {s:?}: {e} (e.g. 90s, 30m, 1h, 7d)")))?;
    if d > Duration::from_secs(100 * 365 * 86400) {
        return Err(Error::InvalidArgument(format!("duration {s:?} is longer than 100 years")));
    }
    Ok(d)
}

/// A token's lifetime (`--ttl`, Python `ttl=`): a duration as [`parse_ttl`] reads it,
/// more than zero (a token that is expired when issued is a mistake, not a choice).
pub fn parse_lifetime(s: &str) -> Result<Duration> {
    let d = parse_ttl(s)?;
    if d.is_zero() {
        return Err(Error::InvalidArgument(format!(
            "token lifetime {s:?} is zero; give a positive one (e.g. 1h, 8h, 7d)"
        )));
    }
    Ok(d)
}

/// Latest time tokens may name (RFC 3339 dates end before year 10000).
pub fn max_time() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799)
}

/// `now + d`, refusing times past [`max_time`].
pub fn time_after(now: SystemTime, d: Duration) -> Result<SystemTime> {
    now.checked_add(d).filter(|t| *t <= max_time()).ok_or_else(|| Error::InvalidArgument("time out of range".into()))
}

/// Parses an RFC 3339 time ("2026-11-26T10:00:00Z") or Unix seconds.
pub fn parse_time(s: &str) -> Result<SystemTime> {
    if let Ok(secs) = s.parse::<u64>() {
        return SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(secs))
            .filter(|t| *t < max_time())
            .ok_or_else(|| Error::InvalidArgument(format!("time {s:?} is out of range")));
    }
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| Error::InvalidArgument(format!("time {s:?}: {e} (RFC 3339, e.g. 2026-11-26T10:00:00Z)")))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
