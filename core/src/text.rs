//! Text built by appending pieces.
//!
//! Messages, field paths and header values are joined here rather than with `format!`,
//! `to_string` or `[..].concat()`: core's formatting machinery (`Formatter`, padding,
//! `Arguments`) was about 5 KB of the npm package's wasm and `concat`'s generic join another
//! 441 B (issue 13's size goal: the `.wasm` at most 60 KB gzipped).

use alloc::string::String;

/// The pieces one after another.
pub fn concat(parts: &[&str]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        out.push_str(part);
    }
    out
}

/// An unsigned integer in decimal.
pub fn decimal(n: u64) -> String {
    let mut out = String::new();
    crate::json::write_u64(&mut out, n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_and_numbers() {
        assert_eq!(concat(&[]), "");
        assert_eq!(
            concat(&["providers[0]", ".", "weight"]),
            "providers[0].weight"
        );
        assert_eq!(decimal(0), "0");
        assert_eq!(decimal(1200), "1200");
        assert_eq!(decimal(u64::MAX), "18446744073709551615");
    }
}
