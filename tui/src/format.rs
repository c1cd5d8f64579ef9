//! Short human forms of durations, sizes and rates for narrow table cells (SI units: GB = 10^9 B,
//! as in the benches).

/// `0.8s`, `45s`, `2m05s`, `1h02m`, `3d04h`.
pub fn seconds(value: f64) -> String {
    if !value.is_finite() || value < 0.0 {
        return "-".to_string();
    }
    if value < 10.0 {
        return format!("{value:.1}s");
    }
    let whole = value.round() as u64;
    match whole {
        0..=59 => format!("{whole}s"),
        60..=3_599 => format!("{}m{:02}s", whole / 60, whole % 60),
        3_600..=86_399 => format!("{}h{:02}m", whole / 3_600, whole % 3_600 / 60),
        _ => format!("{}d{:02}h", whole / 86_400, whole % 86_400 / 3_600),
    }
}

/// `512 B`, `12.3 kB`, `4.0 GB`.
pub fn bytes(value: f64) -> String {
    if !value.is_finite() || value < 0.0 {
        return "-".to_string();
    }
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut scaled = value;
    let mut unit = 0;
    while scaled >= 1000.0 && unit < UNITS.len() - 1 {
        scaled /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{scaled:.0} B")
    } else if scaled < 100.0 {
        format!("{scaled:.1} {}", UNITS[unit])
    } else {
        format!("{scaled:.0} {}", UNITS[unit])
    }
}

/// `12.3 MB/s`.
pub fn rate(bytes_per_s: f64) -> String {
    format!("{}/s", bytes(bytes_per_s))
}

/// `14:05:03` (UTC) for a time in ms since the epoch; the console and the appliance both run
/// with UTC clocks, and the time zone would not fit the column anyway.
pub fn clock(time_unix_ms: u64) -> String {
    let seconds_of_day = time_unix_ms / 1000 % 86_400;
    format!(
        "{:02}:{:02}:{:02}",
        seconds_of_day / 3_600,
        seconds_of_day % 3_600 / 60,
        seconds_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(seconds(0.84), "0.8s");
        assert_eq!(seconds(45.2), "45s");
        assert_eq!(seconds(125.0), "2m05s");
        assert_eq!(seconds(3_720.0), "1h02m");
        assert_eq!(seconds(273_600.0), "3d04h");
        assert_eq!(seconds(f64::NAN), "-");
    }

    #[test]
    fn sizes_and_rates() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(12_345.0), "12.3 kB");
        assert_eq!(bytes(4e9), "4.0 GB");
        assert_eq!(bytes(250e6), "250 MB");
        assert_eq!(rate(12.3e6), "12.3 MB/s");
        assert_eq!(bytes(-1.0), "-");
    }

    #[test]
    fn clock_is_utc_time_of_day() {
        assert_eq!(clock(1_764_165_903_000), "14:05:03");
    }
}
