//! Kubernetes resource quantities (`10Gi`, `500M`, `1e9`) as bytes.

use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
#[error("`{0}` is not a storage quantity such as 10Gi or 500M")]
pub struct BadQuantity(pub String);

/// Bytes in a storage quantity, rounded up to a whole byte.
pub fn parse_bytes(q: &str) -> Result<u64, BadQuantity> {
    let bad = || BadQuantity(q.to_string());
    let s = q.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().map_err(|_| bad())?;
            10f64.powi(exp)
        }
        _ => return Err(bad()),
    };
    let value: f64 = number.parse().map_err(|_| bad())?;
    if !value.is_finite() || value < 0.0 {
        return Err(bad());
    }
    let bytes = (value * multiplier).ceil();
    if bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_decimal_suffixes() {
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("128Mi"), Ok(128 << 20));
        assert_eq!(parse_bytes("500M"), Ok(500_000_000));
        assert_eq!(parse_bytes("2k"), Ok(2000));
        assert_eq!(parse_bytes("1e9"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("42"), Ok(42));
        assert_eq!(parse_bytes("1500m"), Ok(2));
    }

    #[test]
    fn rejects_garbage() {
        for q in ["", "Gi", "1GB", "-1Gi", "ten", "1Xi"] {
            assert!(parse_bytes(q).is_err(), "{q}");
        }
    }
}
