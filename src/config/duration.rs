//! Human durations: "90s", "5m", "1h", "1h30m", "500ms", "2d".

use std::time::Duration;

/// Parses a duration made of one or more `<number><unit>` parts.
pub fn parse(input: &str) -> Result<Duration, String> {
    let text = input.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "{input:?} is not a duration like \"90s\", \"5m\" or \"1h\""
            ));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{input:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            "" => return Err(format!("{input:?} needs a unit (ms, s, m, h, d)")),
            other => {
                return Err(format!(
                    "{input:?}: unknown unit {other:?} (use ms, s, m, h, d)"
                ));
            }
        };
        let part = unit
            .checked_mul(u32::try_from(number).map_err(|_| format!("{input:?}: number too large"))?)
            .ok_or_else(|| format!("{input:?}: too long"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("{input:?}: too long"))?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        for (text, secs) in [
            ("90s", 90),
            ("5m", 300),
            ("1h", 3600),
            ("1h30m", 5400),
            ("2d", 172_800),
        ] {
            assert_eq!(parse(text), Ok(Duration::from_secs(secs)), "{text}");
        }
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn rejects_missing_or_unknown_units() {
        for text in ["", "90", "5x", "s", "1.5h"] {
            assert!(parse(text).is_err(), "{text}");
        }
    }
}
