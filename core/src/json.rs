//! A small JSON reader and writer for the engine's own needs: the configuration, the fields a
//! host reads from (and rewrites in) a chat request, error bodies and event reports.
//!
//! Why not `serde_json`: it was the largest part of both wasm builds (its parser, the code
//! derived for every configuration struct, float formatting), and the Envoy filter and the npm
//! package have size goals. What is needed here is much less: a strict RFC 8259 parser into a
//! tree (duplicate keys and lone surrogates refused, nesting bounded, numbers kept as written so
//! a rewritten request changes only what was rewritten) and an escaping writer.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Deepest nesting accepted (a request nests a few levels; more is hostile).
pub const MAX_DEPTH: usize = 128;

/// A parsed JSON value. Objects keep their members in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number, as written.
    Number(Number),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<Value>),
    /// An object.
    Object(Vec<(String, Value)>),
}

/// A number as written in the document (so it is written back unchanged).
#[derive(Debug, Clone, PartialEq)]
pub struct Number(String);

impl Number {
    /// Its text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// As a float (every JSON number is one, possibly rounded or infinite).
    ///
    /// Correctly rounded when the number has at most 15 significant digits and a decimal
    /// exponent within ±22 once they are read as an integer (Clinger's fast path: both factors
    /// are exact doubles), which covers any value a configuration holds; otherwise within a few
    /// units in the last place. Not `str::parse`: core's correctly-rounding parser and its
    /// tables are 17 KB of the npm package's wasm.
    pub fn as_f64(&self) -> f64 {
        const POW10: [f64; 23] = [
            1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
            1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
        ];
        let d = Decimal::read(self.0.as_bytes());
        // The first 19 significant digits fit a u64; the rest are dropped.
        let kept = d.digits.get(..19).unwrap_or(&d.digits);
        let mantissa = kept
            .iter()
            .fold(0u64, |m, &b| m * 10 + u64::from(b.wrapping_sub(b'0')));
        let mut exp10 = d.point - kept.len() as i64;
        let mut value = mantissa as f64;
        // Scale by at most 10^22 per step: each step is one rounding.
        while exp10 != 0 && value.is_finite() && value != 0.0 {
            let step = exp10.clamp(-22, 22);
            let factor = POW10
                .get(step.unsigned_abs() as usize)
                .copied()
                .unwrap_or(1.0);
            value = if step > 0 {
                value * factor
            } else {
                value / factor
            };
            exp10 -= step;
        }
        if d.negative {
            -value
        } else {
            value
        }
    }

    /// As an unsigned integer, when written as one that fits (`3`, not `3.0` or `-3`).
    pub fn as_u64(&self) -> Option<u64> {
        if self.0.bytes().all(|b| b.is_ascii_digit()) {
            self.0.parse().ok()
        } else {
            None
        }
    }
}

/// A JSON number as an exact decimal: `0.d₁d₂…dₖ × 10^point`, with no leading or trailing zero
/// digit (zero has no digits and is never negative). Read without any rounding, for the cache
/// key's canonical numbers and for [`Number::as_f64`].
pub(crate) struct Decimal {
    pub(crate) negative: bool,
    pub(crate) digits: Vec<u8>,
    pub(crate) point: i64,
}

impl Decimal {
    /// Reads the text of a validated JSON number. The exponent saturates far beyond any double.
    pub(crate) fn read(raw: &[u8]) -> Decimal {
        let (negative, rest) = match raw.split_first() {
            Some((b'-', rest)) => (true, rest),
            _ => (false, raw),
        };
        let e_at = rest
            .iter()
            .position(|&b| b == b'e' || b == b'E')
            .unwrap_or(rest.len());
        let (mantissa, exponent) = rest.split_at(e_at);
        let mut point: i64 = 0;
        let mut digits = Vec::with_capacity(mantissa.len());
        let mut seen_dot = false;
        for &b in mantissa {
            if b == b'.' {
                seen_dot = true;
            } else if digits.is_empty() && b == b'0' {
                if seen_dot {
                    point -= 1; // a leading zero after the point moves it left
                }
            } else {
                digits.push(b);
                if !seen_dot {
                    point += 1;
                }
            }
        }
        while digits.last() == Some(&b'0') {
            digits.pop();
        }
        let exponent = exponent.get(1..).unwrap_or_default();
        let (exp_negative, exp_digits) = match exponent.split_first() {
            Some((b'-', rest)) => (true, rest),
            Some((b'+', rest)) => (false, rest),
            _ => (false, exponent),
        };
        let mut exp: i64 = 0;
        for &b in exp_digits {
            exp = (exp * 10 + i64::from(b.wrapping_sub(b'0'))).min(1 << 40);
        }
        point += if exp_negative { -exp } else { exp };
        if digits.is_empty() {
            return Decimal {
                negative: false,
                digits,
                point: 0,
            };
        }
        Decimal {
            negative,
            digits,
            point,
        }
    }
}

impl Value {
    /// An object member.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// A string's text.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// An unsigned integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Number(n) => n.as_u64(),
            _ => None,
        }
    }

    /// A number as a float.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(n.as_f64()),
            _ => None,
        }
    }

    /// Sets an object member (replacing it in place, or appending it); `false` if this is
    /// not an object.
    pub fn set(&mut self, key: &str, value: Value) -> bool {
        let Value::Object(members) = self else {
            return false;
        };
        match members.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => members.push((key.into(), value)),
        }
        true
    }

    /// A number value from an unsigned integer.
    pub fn from_u64(n: u64) -> Value {
        Value::Number(Number(crate::text::decimal(n)))
    }

    /// Appends the compact JSON text of this value.
    pub fn write(&self, out: &mut String) {
        match self {
            Value::Null => out.push_str("null"),
            Value::Bool(true) => out.push_str("true"),
            Value::Bool(false) => out.push_str("false"),
            Value::Number(n) => out.push_str(&n.0),
            Value::String(s) => write_str(out, s),
            Value::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write(out);
                }
                out.push(']');
            }
            Value::Object(members) => {
                out.push('{');
                for (i, (k, v)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(out, k);
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }

    /// The compact JSON text of this value.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }
}

/// Why a document is not JSON, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    /// What was wrong.
    pub what: &'static str,
    /// The byte offset where it was found.
    pub at: usize,
}

impl JsonError {
    /// "what at byte N", appended rather than `format!`ted: core's formatting machinery was
    /// about 5 KB of the npm package's wasm (issue 13's size goal).
    pub fn message(&self) -> String {
        let mut out = String::with_capacity(self.what.len() + 16);
        out.push_str(self.what);
        out.push_str(" at byte ");
        write_u64(&mut out, self.at as u64);
        out
    }
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl core::error::Error for JsonError {}

/// Parses a whole document (only whitespace may follow the value).
pub fn parse(bytes: &[u8]) -> Result<Value, JsonError> {
    let mut p = Parser { bytes, at: 0 };
    p.skip_ws();
    let v = p.value(0)?;
    p.skip_ws();
    if p.at < bytes.len() {
        return Err(p.fail("trailing characters after the value"));
    }
    Ok(v)
}

/// Parses a whole document as [`parse`] does, accepting and refusing exactly the same bytes
/// with the same error, but keeps only the top level: a top-level object's (or array's) members
/// keep their scalar values (strings, numbers, booleans, null), and containers nested in it are
/// checked whole and come back empty (`[]`, `{}`), so their kind is still known.
///
/// Why: a host reads a few top-level fields of every request and answer (`model`, `stream`,
/// `max_tokens`; `choices`, `error`), and building the tree of a whole conversation only to drop
/// it was most of a pass-through request's work in the Envoy filter (allocations and frees).
///
/// ```rust
/// use unbusy_core::json::{parse_shallow, Value};
///
/// let v = parse_shallow(br#"{"model":"m","choices":[{"index":0}],"usage":{"n":1}}"#).unwrap();
/// assert_eq!(v.get("model").and_then(Value::as_str), Some("m"));
/// assert_eq!(v.get("choices"), Some(&Value::Array(Vec::new())));
/// assert_eq!(v.get("usage"), Some(&Value::Object(Vec::new())));
/// assert!(parse_shallow(br#"{"a":[{"k":1,"k":2}]}"#).is_err()); // checked all the way down
/// ```
pub fn parse_shallow(bytes: &[u8]) -> Result<Value, JsonError> {
    let mut p = Parser { bytes, at: 0 };
    p.skip_ws();
    let v = match p.peek() {
        Some(b'[') => p.array_with(1, Parser::shallow)?,
        Some(b'{') => p.object_with(1, Parser::shallow)?,
        _ => p.value(0)?,
    };
    p.skip_ws();
    if p.at < bytes.len() {
        return Err(p.fail("trailing characters after the value"));
    }
    Ok(v)
}

struct Parser<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// A string as checked by [`Parser::key`]: borrowed when it has no escape (its bytes are then
/// its value), decoded otherwise.
enum Key<'a> {
    Raw(&'a [u8]),
    Decoded(String),
}

impl Key<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Key::Raw(b) => b,
            Key::Decoded(s) => s.as_bytes(),
        }
    }
}

impl<'a> Parser<'a> {
    fn fail(&self, what: &'static str) -> JsonError {
        JsonError { what, at: self.at }
    }

    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    #[inline(always)]
    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// Where the run of plain string bytes starting at `from` ends (at a quote, a backslash, a
    /// control byte or the end).
    #[inline(always)]
    fn run_end(&self, from: usize) -> usize {
        let rest = self.bytes.get(from..).unwrap_or(&[]);
        from + rest
            .iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
            .unwrap_or(rest.len())
    }

    fn literal(&mut self, word: &'static [u8], v: Value) -> Result<Value, JsonError> {
        if self.bytes.get(self.at..self.at + word.len()) == Some(word) {
            self.at += word.len();
            Ok(v)
        } else {
            Err(self.fail("expected a value"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, JsonError> {
        match self.peek() {
            None => Err(self.fail("unexpected end of input")),
            Some(b'n') => self.literal(b"null", Value::Null),
            Some(b't') => self.literal(b"true", Value::Bool(true)),
            Some(b'f') => self.literal(b"false", Value::Bool(false)),
            Some(b'"') => self.string().map(Value::String),
            Some(b'[') => self.array(depth + 1),
            Some(b'{') => self.object(depth + 1),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.fail("expected a value")),
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, JsonError> {
        self.array_with(depth, Self::value)
    }

    fn object(&mut self, depth: usize) -> Result<Value, JsonError> {
        self.object_with(depth, Self::value)
    }

    /// A member of a shallow parse: a scalar as [`Parser::value`] reads it, a container checked
    /// by [`Parser::skip`] and left empty.
    fn shallow(&mut self, depth: usize) -> Result<Value, JsonError> {
        match self.peek() {
            Some(b'[') => {
                self.skip(depth)?;
                Ok(Value::Array(Vec::new()))
            }
            Some(b'{') => {
                self.skip(depth)?;
                Ok(Value::Object(Vec::new()))
            }
            _ => self.value(depth),
        }
    }

    /// Checks a value exactly as [`Parser::value`] does (the same bytes accepted, the same
    /// errors at the same places) without building it: nothing is allocated for strings without
    /// escapes, numbers or arrays, only a list of borrowed keys per object.
    fn skip(&mut self, depth: usize) -> Result<(), JsonError> {
        match self.peek() {
            None => Err(self.fail("unexpected end of input")),
            Some(b'n') => self.literal(b"null", Value::Null).map(drop),
            Some(b't') => self.literal(b"true", Value::Null).map(drop),
            Some(b'f') => self.literal(b"false", Value::Null).map(drop),
            Some(b'"') => self.key().map(drop),
            Some(b'-' | b'0'..=b'9') => self.number_span().map(drop),
            Some(b'[') => self.walk_array(depth + 1, Self::skip),
            Some(b'{') => self.walk_object(depth + 1, |p, _, depth| p.skip(depth)),
            Some(_) => Err(self.fail("expected a value")),
        }
    }

    /// A string, checked as [`Parser::string`] checks it: borrowed when it is one run of valid
    /// UTF-8 without escapes (the common case), else read again by [`Parser::string`] from its
    /// quote, which decodes it or fails exactly as a full parse would.
    fn key(&mut self) -> Result<Key<'a>, JsonError> {
        let quote = self.at;
        let start = quote + 1;
        let end = self.run_end(start);
        let bytes = self.bytes;
        if bytes.get(end) == Some(&b'"') {
            if let Some(run) = bytes.get(start..end) {
                if core::str::from_utf8(run).is_ok() {
                    self.at = end + 1;
                    return Ok(Key::Raw(run));
                }
            }
        }
        self.at = quote;
        self.string().map(Key::Decoded)
    }

    fn array_with(
        &mut self,
        depth: usize,
        member: fn(&mut Self, usize) -> Result<Value, JsonError>,
    ) -> Result<Value, JsonError> {
        let mut items = Vec::new();
        self.walk_array(depth, |p, depth| {
            items.push(member(p, depth)?);
            Ok(())
        })?;
        Ok(Value::Array(items))
    }

    fn object_with(
        &mut self,
        depth: usize,
        member: fn(&mut Self, usize) -> Result<Value, JsonError>,
    ) -> Result<Value, JsonError> {
        let mut members: Vec<(String, Value)> = Vec::new();
        self.walk_object(depth, |p, key, depth| {
            let key = match key {
                Key::Raw(b) => String::from_utf8_lossy(b).into_owned(),
                Key::Decoded(s) => s.clone(),
            };
            let value = member(p, depth)?;
            members.push((key, value));
            Ok(())
        })?;
        Ok(Value::Object(members))
    }

    /// Reads an array at `depth` (its `[` next): each element by `item`, then the separators
    /// and the closing `]`. The one place the array grammar is written, for the full parse,
    /// the shallow parse and [`Parser::skip`] alike.
    fn walk_array(
        &mut self,
        depth: usize,
        mut item: impl FnMut(&mut Self, usize) -> Result<(), JsonError>,
    ) -> Result<(), JsonError> {
        if depth > MAX_DEPTH {
            return Err(self.fail("nested too deeply"));
        }
        self.at += 1; // '['
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(());
        }
        loop {
            self.skip_ws();
            item(self, depth)?;
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(());
                }
                _ => return Err(self.fail("expected `,` or `]`")),
            }
        }
    }

    /// Reads an object at `depth` (its `{` next): each key (refusing one seen before in the
    /// same object), then its value by `member`, given the key; the one place the object
    /// grammar is written.
    fn walk_object(
        &mut self,
        depth: usize,
        mut member: impl FnMut(&mut Self, &Key<'a>, usize) -> Result<(), JsonError>,
    ) -> Result<(), JsonError> {
        if depth > MAX_DEPTH {
            return Err(self.fail("nested too deeply"));
        }
        self.at += 1; // '{'
        let mut keys: Vec<Key<'a>> = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(());
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.fail("expected a string key"));
            }
            let key_at = self.at;
            let key = self.key()?;
            if keys.iter().any(|k| k.bytes() == key.bytes()) {
                return Err(JsonError {
                    what: "duplicate key",
                    at: key_at,
                });
            }
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.fail("expected `:`"));
            }
            self.at += 1;
            self.skip_ws();
            member(self, &key, depth)?;
            keys.push(key);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(());
                }
                _ => return Err(self.fail("expected `,` or `}`")),
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        self.at - start
    }

    fn number(&mut self) -> Result<Value, JsonError> {
        let start = self.number_span()?;
        let text = self
            .bytes
            .get(start..self.at)
            .and_then(|b| core::str::from_utf8(b).ok())
            .unwrap_or("0");
        Ok(Value::Number(Number(text.into())))
    }

    /// Reads a number's bytes, returning where it started.
    fn number_span(&mut self) -> Result<usize, JsonError> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.fail("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return Err(self.fail("invalid number"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if self.digits() == 0 {
                return Err(self.fail("invalid number"));
            }
        }
        Ok(start)
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let mut n = 0u32;
        for _ in 0..4 {
            let d = match self.peek() {
                Some(c @ b'0'..=b'9') => c - b'0',
                Some(c @ b'a'..=b'f') => c - b'a' + 10,
                Some(c @ b'A'..=b'F') => c - b'A' + 10,
                _ => return Err(self.fail("invalid \\u escape")),
            };
            n = n * 16 + u32::from(d);
            self.at += 1;
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String, JsonError> {
        self.at += 1; // '"'
        let mut out = String::new();
        loop {
            // Copy the run up to the next quote, backslash or control byte at once.
            let start = self.at;
            self.at = self.run_end(start);
            let run = self.bytes.get(start..self.at).unwrap_or(&[]);
            match core::str::from_utf8(run) {
                Ok(s) => out.push_str(s),
                Err(_) => {
                    return Err(JsonError {
                        what: "invalid UTF-8 in a string",
                        at: start,
                    })
                }
            }
            match self.peek() {
                Some(b'"') => {
                    self.at += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.at += 1;
                    let c = self.peek();
                    self.at += 1;
                    match c {
                        Some(b'"') => out.push('"'),
                        Some(b'\\') => out.push('\\'),
                        Some(b'/') => out.push('/'),
                        Some(b'b') => out.push('\u{8}'),
                        Some(b'f') => out.push('\u{c}'),
                        Some(b'n') => out.push('\n'),
                        Some(b'r') => out.push('\r'),
                        Some(b't') => out.push('\t'),
                        Some(b'u') => {
                            let hi = self.hex4()?;
                            let code = if (0xd800..0xdc00).contains(&hi) {
                                if self.bytes.get(self.at..self.at + 2) != Some(b"\\u") {
                                    return Err(self.fail("lone surrogate"));
                                }
                                self.at += 2;
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return Err(self.fail("lone surrogate"));
                                }
                                0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                            } else if (0xdc00..0xe000).contains(&hi) {
                                return Err(self.fail("lone surrogate"));
                            } else {
                                hi
                            };
                            match char::from_u32(code) {
                                Some(ch) => out.push(ch),
                                None => return Err(self.fail("invalid \\u escape")),
                            }
                        }
                        _ => return Err(self.fail("invalid escape")),
                    }
                }
                Some(_) => return Err(self.fail("control character in a string")),
                None => return Err(self.fail("unterminated string")),
            }
        }
    }
}

/// Appends `s` as a JSON string.
pub fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let b = c as u32;
                out.push_str("\\u00");
                out.push(char::from_digit(b >> 4, 16).unwrap_or('0'));
                out.push(char::from_digit(b & 0xf, 16).unwrap_or('0'));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `s` as a JSON string, for messages and log lines: quotes and control characters escaped,
/// so a name from the configuration cannot break a line. Hosts use it instead of `{:?}`,
/// whose `Debug` for strings links Unicode tables and escaping code (issue 13's size goals).
pub fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    write_str(&mut out, s);
    out
}

/// Appends an unsigned integer.
pub fn write_u64(out: &mut String, n: u64) {
    let mut div = 1u64;
    while n / div >= 10 {
        div *= 10;
    }
    loop {
        out.push(char::from(b'0' + ((n / div) % 10) as u8));
        if div == 1 {
            break;
        }
        div /= 10;
    }
}

/// Appends a float with at most `decimals` decimals (trailing zeros dropped), without the
/// standard library's float formatting (which is large in wasm); `null` if not finite.
pub fn write_f64(out: &mut String, x: f64, decimals: u32) {
    if !x.is_finite() {
        out.push_str("null");
        return;
    }
    if x < 0.0 {
        out.push('-');
    }
    let scale = 10u64.pow(decimals.min(9));
    let scaled = (x.abs() * scale as f64 + 0.5) as u64; // saturates for huge values
    write_u64(out, scaled / scale);
    let mut frac = scaled % scale;
    if frac > 0 {
        out.push('.');
        let mut div = scale / 10;
        while frac > 0 && div > 0 {
            out.push(char::from(b'0' + (frac / div) as u8));
            frac %= div;
            div /= 10;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn numbers_read_as_floats_match_the_standard_parser() {
        let read = |t: &str| Number(t.into()).as_f64();
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..50_000 {
            // Up to 15 significant digits and a small exponent: exact.
            let digits = rng.u64(0..1_000_000_000_000_000);
            let text = std::format!("{digits}e{}", rng.i32(-22..=7));
            assert_eq!(read(&text), text.parse::<f64>().unwrap(), "{text}");
            let text = std::format!("-0.{digits:015}");
            assert_eq!(read(&text), text.parse::<f64>().unwrap(), "{text}");
            // Anything else: within a few units in the last place.
            let text = std::format!("{}.{}E{}", rng.u64(..), rng.u64(..), rng.i32(-300..290));
            let (ours, std) = (read(&text), text.parse::<f64>().unwrap());
            assert!(
                ((ours - std) / std).abs() < 1e-14,
                "{text}: {ours} vs {std}"
            );
        }
        assert_eq!(read("1e400"), f64::INFINITY);
        assert_eq!(read("-1e-400"), 0.0);
        assert_eq!(read("0.000"), 0.0);
        assert_eq!(read("0.1"), 0.1);
        assert_eq!(read("2.5E+1"), 25.0);
        assert_eq!(
            read("123456789012345678901234567890"),
            1.2345678901234568e29
        );
    }

    #[test]
    fn parses_and_writes_back_unchanged() {
        let text = r#"{"model":"m","n":1.50,"e":-2E+3,"a":[true,false,null,{"x":"\u00e9\ud83d\ude00\n"}],"s":"q\"\\/"}"#;
        let v = parse(text.as_bytes()).unwrap();
        assert_eq!(v.get("model").and_then(Value::as_str), Some("m"));
        assert_eq!(v.get("n").and_then(Value::as_f64), Some(1.5));
        assert_eq!(v.get("n").and_then(Value::as_u64), None);
        let back = v.to_text();
        assert_eq!(parse(back.as_bytes()).unwrap(), v);
        assert!(
            back.contains("\"n\":1.50") && back.contains("-2E+3"),
            "{back}"
        );
    }

    #[test]
    fn refuses_what_is_not_json() {
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\":1,}",
            "01",
            "1.",
            "-",
            "1e",
            "\"\\ud800\"",
            "\"\\udc00x\"",
            "{\"a\":1,\"a\":2}",
            "\"a\u{1}\"",
            "nul",
            "[1] x",
            "{a:1}",
            "\"\\x\"",
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad:?} accepted");
        }
        assert!(parse(&[b'"', 0xff, b'"']).is_err());
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert_eq!(
            parse(deep.as_bytes()).unwrap_err().what,
            "nested too deeply"
        );
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(parse(ok.as_bytes()).is_ok());
        // Objects, the same bound.
        let objects = |n: usize| r#"{"a":"#.repeat(n) + "1" + &"}".repeat(n);
        assert_eq!(
            parse(objects(MAX_DEPTH + 1).as_bytes()).unwrap_err().what,
            "nested too deeply"
        );
        assert!(parse(objects(MAX_DEPTH).as_bytes()).is_ok());
        // The shallow parse checks the depth of what it skips just as strictly.
        let inside = |n: usize| r#"{"a":"#.to_string() + &"[".repeat(n) + &"]".repeat(n) + "}";
        assert_eq!(
            parse_shallow(inside(MAX_DEPTH).as_bytes())
                .unwrap_err()
                .what,
            "nested too deeply"
        );
        assert!(parse_shallow(inside(MAX_DEPTH - 1).as_bytes()).is_ok());
        let objects_inside =
            |n: usize| r#"{"a":"#.to_string() + &r#"{"b":"#.repeat(n) + "1" + &"}".repeat(n + 1);
        assert_eq!(
            parse_shallow(objects_inside(MAX_DEPTH).as_bytes())
                .unwrap_err()
                .what,
            "nested too deeply"
        );
        assert!(parse_shallow(objects_inside(MAX_DEPTH - 1).as_bytes()).is_ok());
        // An error reads the same shown as through `message`.
        let e = parse(b"[1,]").unwrap_err();
        assert_eq!(alloc::format!("{e}"), e.message());
    }

    #[test]
    fn numbers_keep_their_text_and_escapes_take_either_case_of_hex() {
        let v = parse(br#"[1e3, -0.50, 7]"#).unwrap();
        let Value::Array(items) = v else {
            panic!("not an array")
        };
        let texts: Vec<&str> = items
            .iter()
            .map(|n| match n {
                Value::Number(n) => n.as_str(),
                _ => "",
            })
            .collect();
        assert_eq!(texts, ["1e3", "-0.50", "7"]);
        assert_eq!(
            parse(br#""\u00c9\u00E9\uABCD\uabcd""#).unwrap(),
            Value::String("\u{c9}\u{e9}\u{abcd}\u{abcd}".into())
        );
        // Every short escape.
        assert_eq!(
            parse(br#""\"\\\/\b\f\n\r\t""#).unwrap(),
            Value::String("\"\\/\u{8}\u{c}\n\r\t".into())
        );
        // A surrogate pair is one character past the basic plane.
        assert_eq!(
            parse(br#""\ud83d\ude00 \uDBFF\uDFFF""#).unwrap(),
            Value::String("\u{1f600} \u{10ffff}".into())
        );
    }

    #[test]
    fn set_replaces_in_place_or_appends() {
        let mut v = parse(br#"{"model":"a","x":1}"#).unwrap();
        assert!(v.set("model", Value::String("b".into())));
        assert!(v.set("max_tokens", Value::from_u64(256)));
        assert_eq!(v.to_text(), r#"{"model":"b","x":1,"max_tokens":256}"#);
        assert!(!Value::Null.set("a", Value::Null));
    }

    #[test]
    fn writes_strings_and_numbers() {
        let mut s = String::new();
        write_str(&mut s, "a\"b\\c\n\u{1}é");
        assert_eq!(s, "\"a\\\"b\\\\c\\n\\u0001é\"");
        assert_eq!(quoted("a\"b\nc"), "\"a\\\"b\\nc\"");
        let f = |x: f64| {
            let mut s = String::new();
            write_f64(&mut s, x, 3);
            s
        };
        assert_eq!(f(1.0), "1");
        assert_eq!(f(0.25), "0.25");
        assert_eq!(f(-12.0005), "-12.001");
        assert_eq!(f(f64::NAN), "null");
        assert_eq!(f(1234.5678), "1234.568");
        let mut s = String::new();
        write_u64(&mut s, u64::MAX);
        assert_eq!(s, u64::MAX.to_string());
    }

    /// What [`parse_shallow`] must give for a document [`parse`] reads as `v`.
    fn shallowed(v: &Value) -> Value {
        let empty = |v: &Value| match v {
            Value::Array(_) => Value::Array(Vec::new()),
            Value::Object(_) => Value::Object(Vec::new()),
            other => other.clone(),
        };
        match v {
            Value::Array(items) => Value::Array(items.iter().map(empty).collect()),
            Value::Object(members) => {
                Value::Object(members.iter().map(|(k, v)| (k.clone(), empty(v))).collect())
            }
            other => other.clone(),
        }
    }

    /// The shallow parse accepts and refuses exactly what the full one does, with the same
    /// error at the same place, on documents built to hit every rule below the top level.
    #[test]
    fn the_shallow_parse_agrees_with_the_full_one() {
        let docs: [&[u8]; 22] = [
            br#"{"model":"m","stream":true,"max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#,
            br#"{"a":[{"k":1,"k":2}]}"#,
            br#"{"a":[{"k":1,"\u006b":2}]}"#,
            br#"{"a":{"x":"\ud800"}}"#,
            br#"{"a":{"x":"\ud83d\ude00","y":"\u00e9"}}"#,
            br#"{"a":[1,2,]}"#,
            br#"{"a":[01]}"#,
            br#"{"a":[1.]}"#,
            br#"{"a":[-1.5e+3, 0, true, false, null, "s"]}"#,
            br#"{"a":{"b":{"c":[]}}} x"#,
            br#"{"a":["\q"]}"#,
            b"{\"a\":[\"\x01\"]}",
            b"{\"a\":[\"\xff\"]}",
            b"{\"a\":[\"\xc3\xa9\"]}",
            br#"{"a":{"b" 1}}"#,
            br#"{"a":{1:2}}"#,
            br#"{"a":[nul]}"#,
            br#"{"a":[}"#,
            br#"[[1],{"a":2},3]"#,
            br#""top""#,
            br#"{"a":{},"a":[]}"#,
            br#"{"error":null,"choices":[{"message":{"content":"\"quoted\""}}]}"#,
        ];
        for d in docs {
            assert_eq!(parse_shallow(d), parse(d).map(|v| shallowed(&v)), "{d:?}");
        }
        let deep = [b'['; 200];
        let mut nested = b"{\"a\":".to_vec();
        nested.extend_from_slice(&deep);
        for d in [&deep[..], &nested[..]] {
            assert_eq!(parse_shallow(d), parse(d).map(|v| shallowed(&v)));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = crate::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..40);
            let alphabet = b"{}[]\",:\\u0123456789.eE+-truefalsnl \xff";
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(0..alphabet.len())])
                .collect();
            if let Ok(v) = parse(&bytes) {
                assert_eq!(parse(v.to_text().as_bytes()).unwrap(), v);
            }
            assert_eq!(parse_shallow(&bytes), parse(&bytes).map(|v| shallowed(&v)));
        }
        let _ = vec![0u8];
    }
}
