//! The two clocks the worker reads: wall time as Lár writes it into step records and
//! attempt histories, and milliseconds since the Unix epoch for leases and delays. One
//! module so that every layer (the executor, the backends, the audit) takes time from the
//! same place and none imports another just for its clock.

/// UTC time with microseconds, ISO-8601 with a `Z`.
pub fn now_utc() -> String {
    // to_rfc3339_opts avoids parsing a format string on every step.
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Milliseconds since the Unix epoch (the clocks of leases and delays).
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    #[test]
    fn wall_time_is_utc_with_microseconds() {
        let t = super::now_utc();
        assert!(t.ends_with('Z'), "{t}");
        let frac = t.rsplit('.').next().unwrap_or_default();
        assert_eq!(frac.len(), "123456Z".len(), "{t}");
        assert!(chrono::DateTime::parse_from_rfc3339(&t).is_ok(), "{t}");
    }

    #[test]
    fn epoch_millis_follow_wall_time() {
        let a = super::now_ms();
        let b = chrono::Utc::now().timestamp_millis();
        assert!(a <= b && b - a < 60_000);
    }
}
