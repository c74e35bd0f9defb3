//! The tool's date shift and its time-of-day pattern, and the Safe Harbor age cut-off, worked
//! out without their per-call costs.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use chrono::Datelike;

/// The tool's date shift of `prefix` + `key`, a number of days in [-50, 50]: a hash of the
/// prefix and the key, byte by byte, modulo 101. The key's part is worked out once for every
/// state the prefix can leave, so a shift costs the prefix's bytes alone.
pub struct DateShifter {
    after_key: Vec<i32>,
}

const SHIFT_STATES: i32 = 2 * super::DATE_SHIFT_RANGE + 1;

fn shift_step(offset: i32, byte: u8) -> i32 {
    (offset * 131 + i32::from(byte)) % SHIFT_STATES
}

impl DateShifter {
    pub fn new(key: &str) -> DateShifter {
        let after_key = (0..SHIFT_STATES)
            .map(|state| key.bytes().fold(state, shift_step))
            .collect();
        DateShifter { after_key }
    }

    pub fn days(&self, prefix: &str) -> i64 {
        let state = prefix.bytes().fold(0, shift_step);
        let offset = self.after_key[usize::try_from(state).unwrap_or_default()];
        i64::from(offset - super::DATE_SHIFT_RANGE)
    }
}

/// The time and zone at the start of `rest`, as the tool's pattern takes them:
/// `^T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))`
/// (matched by hand: a regular expression for every dateTime cost more than the shift).
pub fn time_prefix(rest: &str) -> Option<&str> {
    let b = rest.as_bytes();
    let digit = |i: usize| b.get(i).filter(|c| c.is_ascii_digit()).map(|c| c - b'0');
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    let (h1, h2) = (digit(1)?, digit(2)?);
    let (m1, s1, s2) = (digit(4)?, digit(7)?, digit(8)?);
    digit(5)?;
    let clock = at(0, b'T')
        && (h1 <= 1 || (h1 == 2 && h2 <= 3))
        && at(3, b':')
        && m1 <= 5
        && at(6, b':')
        && (s1 <= 5 || (s1 == 6 && s2 == 0));
    if !clock {
        return None;
    }
    let mut i = 9;
    if at(i, b'.') && digit(i + 1).is_some() {
        i += 1;
        while digit(i).is_some() {
            i += 1;
        }
    }
    match b.get(i)? {
        b'Z' => i += 1,
        b'+' | b'-' => {
            let (z1, z2, z3, z4) = (digit(i + 1)?, digit(i + 2)?, digit(i + 4)?, digit(i + 5)?);
            let hours = (z1 == 0 || (z1 == 1 && z2 <= 3)) && z3 <= 5;
            let fourteen = z1 == 1 && z2 == 4 && z3 == 0 && z4 == 0;
            if !at(i + 3, b':') || !(hours || fourteen) {
                return None;
            }
            i += 6;
        }
        _ => return None,
    }
    Some(&rest[..i])
}

/// Today 90 years ago (UTC) as (year, month, day): whoever was born on or before it is over
/// `AGE_THRESHOLD` (89). Asked for every date the rules touch, so it is worked out once a day.
pub fn ninety_years_ago() -> (i32, u32, u32) {
    // The day since the epoch (plus one, so that 0 is none yet) over the packed date.
    static CACHED: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let day = now / 86_400 + 1;
    let cached = CACHED.load(Ordering::Relaxed);
    let packed = if cached >> 32 == day {
        cached & u64::from(u32::MAX)
    } else {
        let today = chrono::DateTime::from_timestamp(i64::try_from(now).unwrap_or(0), 0)
            .unwrap_or_default()
            .date_naive();
        let year = u64::try_from(today.year() - (super::AGE_THRESHOLD + 1)).unwrap_or(0);
        let packed = year << 9 | u64::from(today.month()) << 5 | u64::from(today.day());
        CACHED.store(day << 32 | packed, Ordering::Relaxed);
        packed
    };
    let field = |shift: u32, bits: u64| u32::try_from(packed >> shift & bits).unwrap_or(0);
    (
        i32::try_from(packed >> 9).unwrap_or(0),
        field(5, 15),
        field(0, 31),
    )
}
