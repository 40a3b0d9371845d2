//! Canonical, tenant-scoped cache keys for OpenAI-compatible requests.
//!
//! Two requests that ask the same thing must get the same key, whatever order their JSON keys
//! came in, however their numbers were spelled (`0`, `0.0`, `0e0`), and whatever escapes their
//! strings used. Two tenants must never share a key, or one tenant would be served another's
//! answer. And a body that is not JSON must give "not cacheable", never a panic.
//!
//! ## The canonical form
//! RFC 8785 (JSON Canonicalization Scheme) style:
//! - object members sorted by key, compared as UTF-16 code units; duplicate keys make the body
//!   not cacheable (I-JSON forbids them and providers disagree on which one wins);
//! - numbers laid out as ECMAScript's `Number.prototype.toString` lays them out (`1.0` → `1`,
//!   `1e2` → `100`, `1e21` → `1e+21`, `-0` → `0`), from their exact decimal digits: for numbers
//!   of up to 15 significant digits this is RFC 8785's form; longer ones keep every digit rather
//!   than being rounded to a double (no float code: it is a third of the npm package's wasm);
//! - strings with only the escapes JSON requires (`\"`, `\\`, `\b \f \n \r \t`, other control
//!   characters as `\u00xx`), everything else as raw UTF-8; lone surrogates are malformed;
//! - no insignificant whitespace.
//!
//! ## What is left out
//! Top-level fields that do not change the answer are dropped before hashing
//! ([`IGNORED_FIELDS`]): `user`, `metadata`, `store`, `service_tier`, `prompt_cache_key`,
//! `safety_identifier`. `stream` and `stream_options` are kept: the cached bytes of a streamed
//! answer are SSE and those of a plain one are JSON, so the two must not share an entry.
//!
//! ## What is cacheable
//! - A request marked [`OptIn::Never`] (`x-unbusy-cache: never`, read by
//!   [`crate::request::read`]) never is.
//! - A request marked [`OptIn::Always`] (`x-unbusy-cache: always`) is, if its body is a valid
//!   JSON object.
//! - Otherwise only deterministic requests are: `temperature` present and equal to 0, and `n`
//!   absent or 1. (LLMs are not bit-exact even at temperature 0; serving the same answer to the
//!   same question is what callers of a cache ask for.)
//!
//! ## The key
//! SipHash-1-3 with 128-bit output over a version tag, the tenant, the endpoint path and the
//! canonical body, each length-prefixed so that no two different inputs concatenate alike. The
//! SipHash key is a fixed constant: keys must agree across proxies sharing a Redis cache. Hosts
//! store the tenant beside the entry and check it on a hit, so even a 2^-128 collision cannot
//! cross tenants.
//!
//! The parser builds a flat array of nodes over the borrowed body (no string copies) and emits
//! the canonical form into a reused buffer: about one pass to parse and one to write.

use crate::json::Decimal;
use alloc::borrow::Cow;
use alloc::string::String;
use alloc::vec::Vec;
use core::cmp::Ordering;
use core::fmt;
use core::hash::Hasher;
use siphasher::sip128::{Hasher128, SipHasher13};

/// Top-level request fields that do not change the answer and are left out of the key.
pub const IGNORED_FIELDS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
];

/// Deeper nesting than this is refused (not cacheable): real requests nest a handful of levels,
/// and a bound keeps the recursive parser's stack use bounded on hostile input.
pub const MAX_DEPTH: usize = 128;

/// The fixed SipHash key, so that every proxy computes the same key for the same request.
const SIP_KEY: (u64, u64) = (0x756e_6275_7379_2d63, 0x6163_6865_2d6b_6579);

/// Bumped whenever the canonical form changes, so old cache entries are not misread.
const VERSION_TAG: &[u8] = b"unbusy-cache-key-v1";

/// A 128-bit cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub u128);

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// The caller's explicit wish about caching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptIn {
    /// Cache if the request is deterministic.
    #[default]
    Default,
    /// Cache whatever the settings.
    Always,
    /// Never cache.
    Never,
}

/// Why a request gets no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotCacheable {
    /// The caller opted out.
    OptedOut,
    /// The body is not valid JSON (or not UTF-8); `at` is the byte offset of the problem.
    Malformed {
        /// Byte offset.
        at: usize,
    },
    /// The body is valid JSON but not an object.
    NotAnObject,
    /// The body nests deeper than [`MAX_DEPTH`].
    TooDeep,
    /// The body is larger than 4 GiB.
    TooLarge,
    /// An object has the same key twice.
    DuplicateKey,
    /// Sampling is not deterministic (`temperature` not 0, or `n` > 1) and the caller did not
    /// opt in.
    NonDeterministic,
}

impl fmt::Display for NotCacheable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OptedOut => f.write_str("the request opted out of caching"),
            Self::Malformed { at } => write!(f, "the body is not valid JSON (byte {at})"),
            Self::NotAnObject => f.write_str("the body is not a JSON object"),
            Self::TooDeep => write!(f, "the body nests deeper than {MAX_DEPTH} levels"),
            Self::TooLarge => f.write_str("the body is larger than 4 GiB"),
            Self::DuplicateKey => f.write_str("the body has a duplicate object key"),
            Self::NonDeterministic => {
                f.write_str("sampling is not deterministic (temperature must be 0, n at most 1)")
            }
        }
    }
}

/// What a key is computed from.
#[derive(Debug, Clone, Copy)]
pub struct KeyRequest<'a> {
    /// The tenant's identity (a hash of the API key, or a configured header's value).
    pub tenant: &'a [u8],
    /// The endpoint path, e.g. `/v1/chat/completions`.
    pub endpoint: &'a str,
    /// The request body.
    pub body: &'a [u8],
    /// The caller's explicit wish.
    pub opt_in: OptIn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    True,
    False,
    Number,
    /// A string. Without escapes, `a..b` is its span in the source; with escapes, `a..b` is its
    /// already canonical form in `Canonicalizer::escaped`.
    String {
        escaped: bool,
    },
    Array,
    Object,
}

/// Scalars: `a..b` is the source span (strings: inside the quotes). Containers: `a..b` is the
/// range of child indices in `Canonicalizer::children` (objects: key, value, key, value, ...).
#[derive(Debug, Clone, Copy)]
struct Node {
    kind: Kind,
    a: u32,
    b: u32,
}

/// Stands in for an index that is out of range (which the parser never produces).
const NULL_NODE: Node = Node {
    kind: Kind::Null,
    a: 0,
    b: 0,
};

/// A tenant's identity as the engine's `RequestMeta::tenant`: a keyed 64-bit SipHash of what
/// identifies it (the caller's API key, or a configured header's value), so hosts agree on it
/// and never keep the key itself.
pub fn tenant_id(identity: &[u8]) -> u64 {
    use core::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(SIP_KEY.1, SIP_KEY.0);
    h.write(VERSION_TAG);
    h.write(identity);
    h.finish()
}

/// Reusable buffers for computing keys; keep one per worker to avoid reallocating per request.
#[derive(Debug, Default)]
pub struct Canonicalizer {
    nodes: Vec<Node>,
    children: Vec<u32>,
    pending: Vec<u32>,
    members: Vec<(u32, u32)>,
    /// Canonical forms of strings that had escapes, written while parsing.
    escaped: Vec<u8>,
    out: Vec<u8>,
}

impl Canonicalizer {
    /// Empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The cache key of a request, or why it has none.
    pub fn key(&mut self, request: &KeyRequest<'_>) -> Result<CacheKey, NotCacheable> {
        if request.opt_in == OptIn::Never {
            return Err(NotCacheable::OptedOut);
        }
        let root = self.parse(request.body)?;
        let root_node = self.node(root);
        if root_node.kind != Kind::Object {
            return Err(NotCacheable::NotAnObject);
        }
        if request.opt_in == OptIn::Default && !self.is_deterministic(request.body, root_node)? {
            return Err(NotCacheable::NonDeterministic);
        }
        self.out.clear();
        self.emit(request.body, root, true)?;
        let mut h = SipHasher13::new_with_keys(SIP_KEY.0, SIP_KEY.1);
        for part in [VERSION_TAG, request.tenant, request.endpoint.as_bytes()] {
            h.write_u64(part.len() as u64);
            h.write(part);
        }
        h.write_u64(self.out.len() as u64);
        h.write(&self.out);
        Ok(CacheKey(h.finish128().as_u128()))
    }

    /// The canonical form of any JSON document (every field kept), for tests and debugging.
    pub fn canonical_json(&mut self, body: &[u8]) -> Result<String, NotCacheable> {
        let root = self.parse(body)?;
        self.out.clear();
        self.emit(body, root, false)?;
        String::from_utf8(core::mem::take(&mut self.out))
            .map_err(|_| NotCacheable::Malformed { at: 0 })
    }

    fn node(&self, index: u32) -> Node {
        self.nodes.get(index as usize).copied().unwrap_or(NULL_NODE)
    }

    fn parse(&mut self, body: &[u8]) -> Result<u32, NotCacheable> {
        if u32::try_from(body.len()).is_err() {
            return Err(NotCacheable::TooLarge);
        }
        if let Err(e) = core::str::from_utf8(body) {
            return Err(NotCacheable::Malformed {
                at: e.valid_up_to(),
            });
        }
        self.nodes.clear();
        self.children.clear();
        self.pending.clear();
        self.escaped.clear();
        let mut parser = Parser { src: body, pos: 0 };
        parser.skip_ws();
        let root = parser.value(self, 0)?;
        parser.skip_ws();
        if parser.pos != body.len() {
            return Err(NotCacheable::Malformed { at: parser.pos });
        }
        Ok(root)
    }

    fn push(&mut self, node: Node) -> u32 {
        self.nodes.push(node);
        (self.nodes.len() - 1) as u32
    }

    /// Reads the top-level `temperature` and `n`.
    fn is_deterministic(&self, src: &[u8], root: Node) -> Result<bool, NotCacheable> {
        let mut temperature_zero = false;
        let mut n_ok = true;
        let mut i = root.a;
        while i + 1 < root.b {
            let key = self.node(self.child(i));
            let value = self.node(self.child(i + 1));
            let name = key_text(src, &self.escaped, key);
            let name = name.as_bytes();
            if value.kind == Kind::Number && matches!(name, b"temperature" | b"n") {
                let number =
                    decimal(span(src, value.a, value.b)).ok_or(NotCacheable::Malformed {
                        at: value.a as usize,
                    })?;
                if name == b"temperature" {
                    temperature_zero = number.digits.is_empty();
                } else {
                    n_ok = !number.negative && number.digits == b"1" && number.point == 1;
                }
            } else if name == b"n" && value.kind != Kind::Null {
                n_ok = false;
            }
            i += 2;
        }
        Ok(temperature_zero && n_ok)
    }

    fn child(&self, i: u32) -> u32 {
        self.children.get(i as usize).copied().unwrap_or(0)
    }

    fn emit(&mut self, src: &[u8], index: u32, top_level: bool) -> Result<(), NotCacheable> {
        let node = self.node(index);
        match node.kind {
            Kind::Null => self.out.extend_from_slice(b"null"),
            Kind::True => self.out.extend_from_slice(b"true"),
            Kind::False => self.out.extend_from_slice(b"false"),
            Kind::Number => write_number(span(src, node.a, node.b), &mut self.out).ok_or(
                NotCacheable::Malformed {
                    at: node.a as usize,
                },
            )?,
            Kind::String { .. } => {
                self.out.push(b'"');
                self.out
                    .extend_from_slice(string_span(src, &self.escaped, node));
                self.out.push(b'"');
            }
            Kind::Array => {
                self.out.push(b'[');
                for (n, i) in (node.a..node.b).enumerate() {
                    if n > 0 {
                        self.out.push(b',');
                    }
                    self.emit(src, self.child(i), false)?;
                }
                self.out.push(b']');
            }
            Kind::Object => {
                let base = self.members.len();
                let mut i = node.a;
                while i + 1 < node.b {
                    let key = self.child(i);
                    let keep = !top_level || {
                        let name = key_text(src, &self.escaped, self.node(key));
                        !IGNORED_FIELDS.contains(&&*name)
                    };
                    if keep {
                        self.members.push((key, self.child(i + 1)));
                    }
                    i += 2;
                }
                let (nodes, escaped) = (&self.nodes, &self.escaped[..]);
                let order = |x: u32, y: u32| {
                    let lookup = |i: u32| nodes.get(i as usize).copied().unwrap_or(NULL_NODE);
                    compare_keys(src, escaped, lookup(x), lookup(y))
                };
                let tail = self.members.get_mut(base..).unwrap_or_default();
                crate::sorted_map::sort_by(tail, |x, y| order(x.0, y.0) == Ordering::Less);
                let duplicate = tail
                    .windows(2)
                    .any(|w| matches!(w, [x, y] if order(x.0, y.0) == Ordering::Equal));
                if duplicate {
                    self.members.truncate(base);
                    return Err(NotCacheable::DuplicateKey);
                }
                let end = self.members.len();
                self.out.push(b'{');
                let mut result = Ok(());
                for m in base..end {
                    let Some(&(key, value)) = self.members.get(m) else {
                        break;
                    };
                    if m > base {
                        self.out.push(b',');
                    }
                    result = self.emit(src, key, false).and_then(|()| {
                        self.out.push(b':');
                        self.emit(src, value, false)
                    });
                    if result.is_err() {
                        break;
                    }
                }
                self.members.truncate(base);
                result?;
                self.out.push(b'}');
            }
        }
        Ok(())
    }
}

/// A one-off key (allocates fresh buffers; prefer a reused [`Canonicalizer`] on hot paths).
///
/// ```rust
/// use unbusy_core::cache_key::{cache_key, KeyRequest, NotCacheable, OptIn};
///
/// let key = |tenant: &'static str, body: &'static str| {
///     cache_key(&KeyRequest {
///         tenant: tenant.as_bytes(),
///         endpoint: "/v1/chat/completions",
///         body: body.as_bytes(),
///         opt_in: OptIn::Default,
///     })
/// };
/// let a = key("team-a", r#"{"model":"deepseek-chat","temperature":0,"messages":[]}"#);
/// // The same question: members in another order, `0` spelled `0.0`, an answer-neutral `user`.
/// let b = key(
///     "team-a",
///     r#"{"messages":[], "temperature":0.0, "model":"deepseek-chat", "user":"u1"}"#,
/// );
/// assert_eq!(a, b);
/// assert!(a.is_ok());
/// // Another tenant never shares a key.
/// let other = key("team-b", r#"{"model":"deepseek-chat","temperature":0,"messages":[]}"#);
/// assert_ne!(a, other);
/// // Sampling at temperature 0.7 gives different answers: not cacheable unless opted in.
/// let sampled = key("team-a", r#"{"model":"deepseek-chat","temperature":0.7,"messages":[]}"#);
/// assert_eq!(sampled, Err(NotCacheable::NonDeterministic));
/// ```
pub fn cache_key(request: &KeyRequest<'_>) -> Result<CacheKey, NotCacheable> {
    Canonicalizer::new().key(request)
}

fn span(src: &[u8], a: u32, b: u32) -> &[u8] {
    src.get(a as usize..b as usize).unwrap_or_default()
}

/// A string node's bytes as they are emitted: the source span, or the canonical form written
/// while parsing for strings that had escapes.
fn string_span<'a>(src: &'a [u8], escaped: &'a [u8], node: Node) -> &'a [u8] {
    match node.kind {
        Kind::String { escaped: true } => span(escaped, node.a, node.b),
        _ => span(src, node.a, node.b),
    }
}

/// A string node's decoded text: borrowed when it had no escapes.
fn key_text<'a>(src: &'a [u8], escaped: &'a [u8], node: Node) -> Cow<'a, str> {
    let raw = string_span(src, escaped, node);
    if matches!(node.kind, Kind::String { escaped: true }) {
        let mut buf = Vec::new();
        let _ = decode_string(raw, &mut buf);
        Cow::Owned(String::from_utf8(buf).unwrap_or_default())
    } else {
        Cow::Borrowed(core::str::from_utf8(raw).unwrap_or(""))
    }
}

/// Orders keys by their decoded value as UTF-16 code units (RFC 8785 §3.2.3).
fn compare_keys(src: &[u8], escaped: &[u8], x: Node, y: Node) -> Ordering {
    let plain = |n: Node| matches!(n.kind, Kind::String { escaped: false });
    let (xa, ya) = (span(src, x.a, x.b), span(src, y.a, y.b));
    if plain(x) && plain(y) && xa.is_ascii() && ya.is_ascii() {
        return xa.cmp(ya);
    }
    key_text(src, escaped, x)
        .encode_utf16()
        .cmp(key_text(src, escaped, y).encode_utf16())
}

struct Parser<'a> {
    src: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn err(&self) -> NotCacheable {
        NotCacheable::Malformed { at: self.pos }
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), NotCacheable> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err())
        }
    }

    fn value(&mut self, c: &mut Canonicalizer, depth: usize) -> Result<u32, NotCacheable> {
        if depth > MAX_DEPTH {
            return Err(NotCacheable::TooDeep);
        }
        let start = self.pos as u32;
        match self.peek() {
            Some(b'{') => self.container(c, depth, Kind::Object),
            Some(b'[') => self.container(c, depth, Kind::Array),
            Some(b'"') => self.string(c),
            Some(b't') => self.literal(c, b"true", Kind::True, start),
            Some(b'f') => self.literal(c, b"false", Kind::False, start),
            Some(b'n') => self.literal(c, b"null", Kind::Null, start),
            Some(b'-' | b'0'..=b'9') => {
                self.number()?;
                Ok(c.push(Node {
                    kind: Kind::Number,
                    a: start,
                    b: self.pos as u32,
                }))
            }
            _ => Err(self.err()),
        }
    }

    fn literal(
        &mut self,
        c: &mut Canonicalizer,
        word: &[u8],
        kind: Kind,
        start: u32,
    ) -> Result<u32, NotCacheable> {
        if self.src.get(self.pos..self.pos + word.len()) == Some(word) {
            self.pos += word.len();
            Ok(c.push(Node {
                kind,
                a: start,
                b: self.pos as u32,
            }))
        } else {
            Err(self.err())
        }
    }

    fn container(
        &mut self,
        c: &mut Canonicalizer,
        depth: usize,
        kind: Kind,
    ) -> Result<u32, NotCacheable> {
        let close = if kind == Kind::Object { b'}' } else { b']' };
        self.pos += 1;
        let mark = c.pending.len();
        self.skip_ws();
        if self.peek() == Some(close) {
            self.pos += 1;
        } else {
            loop {
                self.skip_ws();
                if kind == Kind::Object {
                    if self.peek() != Some(b'"') {
                        return Err(self.err());
                    }
                    let key = self.string(c)?;
                    c.pending.push(key);
                    self.skip_ws();
                    self.expect(b':')?;
                    self.skip_ws();
                }
                let value = self.value(c, depth + 1)?;
                c.pending.push(value);
                self.skip_ws();
                match self.peek() {
                    Some(b',') => self.pos += 1,
                    Some(b) if b == close => {
                        self.pos += 1;
                        break;
                    }
                    _ => return Err(self.err()),
                }
            }
        }
        let a = c.children.len() as u32;
        let moved = c.pending.get(mark..).unwrap_or_default();
        c.children.extend_from_slice(moved);
        c.pending.truncate(mark);
        let b = c.children.len() as u32;
        Ok(c.push(Node { kind, a, b }))
    }

    fn string(&mut self, c: &mut Canonicalizer) -> Result<u32, NotCacheable> {
        self.pos += 1; // the opening quote
        let start = self.pos;
        // Where this string's canonical form starts in `c.escaped`, once an escape is seen.
        let mut escaped_from: Option<usize> = None;
        let mut run_start = start;
        loop {
            let rest = self.src.get(self.pos..).unwrap_or_default();
            let Some(offset) = find_string_special(rest) else {
                self.pos = self.src.len();
                return Err(self.err());
            };
            self.pos += offset;
            match self.peek() {
                Some(b'"') => break,
                Some(b'\\') => {
                    escaped_from.get_or_insert(c.escaped.len());
                    let run = self.src.get(run_start..self.pos).unwrap_or_default();
                    c.escaped.extend_from_slice(run);
                    let tail = self.src.get(self.pos..).unwrap_or_default();
                    let (cp, len) = decode_escape(tail).ok_or_else(|| self.err())?;
                    write_escaped_code_point(cp, &mut c.escaped);
                    self.pos += len;
                    run_start = self.pos;
                }
                _ => return Err(self.err()), // a raw control character
            }
        }
        let end = self.pos;
        self.pos += 1; // the closing quote
        let node = match escaped_from {
            None => Node {
                kind: Kind::String { escaped: false },
                a: start as u32,
                b: end as u32,
            },
            Some(from) => {
                let run = self.src.get(run_start..end).unwrap_or_default();
                c.escaped.extend_from_slice(run);
                let to = u32::try_from(c.escaped.len()).map_err(|_| NotCacheable::TooLarge)?;
                Node {
                    kind: Kind::String { escaped: true },
                    a: from as u32,
                    b: to,
                }
            }
        };
        Ok(c.push(node))
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<(), NotCacheable> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err()),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.err());
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.err());
            }
        }
        Ok(())
    }
}

/// The first byte that ends a run of plain string content: `"`, `\` or a control character.
/// Eight bytes at a time (SWAR): string content is most of a chat request's bytes.
fn find_string_special(bytes: &[u8]) -> Option<usize> {
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in chunks.by_ref() {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let mask = special_mask(u64::from_le_bytes(word));
        if mask != 0 {
            return Some(offset + (mask.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    // The tail, padded with a byte that is not special.
    let tail = chunks.remainder();
    let mut word = [b'a'; 8];
    word.get_mut(..tail.len())?.copy_from_slice(tail);
    let mask = special_mask(u64::from_le_bytes(word));
    (mask != 0).then(|| offset + (mask.trailing_zeros() / 8) as usize)
}

/// High bit set in each byte of `w` (little-endian) that is `"`, `\` or below 0x20, possibly
/// also in bytes above a true hit (a borrow carries upward), never below the first one: so the
/// lowest set bit always marks the first special byte.
const fn special_mask(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let quote = w ^ (ONES * b'"' as u64);
    let backslash = w ^ (ONES * b'\\' as u64);
    let zero_quote = quote.wrapping_sub(ONES) & !quote;
    let zero_backslash = backslash.wrapping_sub(ONES) & !backslash;
    let control = w.wrapping_sub(ONES * 0x20);
    (zero_quote | zero_backslash | control) & !w & HIGHS
}

/// Exponents beyond these make a number not cacheable: above, it is no finite double (RFC 8785
/// refuses it); below, far under the smallest subnormal.
const MAX_POINT: i64 = 309;
const MIN_POINT: i64 = -400;

/// Reads a validated JSON number exactly. `None` when its exponent is out of [`MIN_POINT`,
/// `MAX_POINT`].
/// Whether a JSON number, as written, is zero the way the determinism rule reads a top-level
/// `temperature` (so a host that already read the request can tell a sampled request has no
/// key without canonicalising it: see `request::read`).
pub(crate) fn is_zero(raw: &[u8]) -> bool {
    decimal(raw).is_some_and(|d| d.digits.is_empty())
}

fn decimal(raw: &[u8]) -> Option<Decimal> {
    let d = Decimal::read(raw);
    (d.digits.is_empty() || (MIN_POINT..=MAX_POINT).contains(&d.point)).then_some(d)
}

/// Writes a validated JSON number in canonical form: the layout of ECMAScript's
/// `Number.prototype.toString` (`1.0` → `1`, `1e2` → `100`, `1e21` → `1e+21`, `-0` → `0`)
/// applied to the number's exact decimal digits. For every number of up to 15 significant digits
/// within a double's range this is exactly RFC 8785's form (such a decimal is the shortest that
/// round-trips through its double); longer numbers keep all their digits where RFC 8785 would
/// round them, so two spellings of one double may get two keys (a missed hit, never a wrong one).
/// `None` for numbers out of a double's range.
fn write_number(raw: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let (negative, digits) = match raw.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, raw),
    };
    // Fast path: a plain integer of up to 15 digits is exactly representable and JSON already
    // forbids leading zeros, so it is its own canonical form.
    if digits.len() <= 15 && digits.iter().all(u8::is_ascii_digit) {
        if digits == b"0" {
            out.push(b'0');
        } else {
            if negative {
                out.push(b'-');
            }
            out.extend_from_slice(digits);
        }
        return Some(());
    }
    if write_plain_decimal(negative, digits, out) {
        return Some(());
    }
    write_decimal(&decimal(raw)?, out);
    Some(())
}

/// Fast path for the decimals requests are full of (`0.7`, `1.0`, `0.95`): without an exponent
/// and with at most 15 significant digits, a decimal is exactly what its double prints as once
/// trailing fraction zeros are gone (two such decimals never share a double, as 10^15 < 2^53).
/// Values below 1e-6 print in exponent form and take the general path. Returns false when the
/// number is not of this shape (nothing was written).
fn write_plain_decimal(negative: bool, digits: &[u8], out: &mut Vec<u8>) -> bool {
    let Some(dot) = digits.iter().position(|&b| b == b'.') else {
        return false;
    };
    let (int, frac) = (
        digits.get(..dot).unwrap_or_default(),
        digits.get(dot + 1..).unwrap_or_default(),
    );
    if !int.iter().chain(frac).all(u8::is_ascii_digit) {
        return false; // an exponent
    }
    let frac_len = frac.iter().rposition(|&b| b != b'0').map_or(0, |i| i + 1);
    let frac = frac.get(..frac_len).unwrap_or_default();
    let significant = if int == b"0" {
        let leading_zeros = frac.iter().take_while(|&&b| b == b'0').count();
        if leading_zeros > 5 {
            return false;
        }
        frac.len() - leading_zeros
    } else {
        int.len() + frac.len()
    };
    if significant > 15 {
        return false;
    }
    if frac.is_empty() && int == b"0" {
        out.push(b'0'); // -0.0 is 0
        return true;
    }
    if negative {
        out.push(b'-');
    }
    out.extend_from_slice(int);
    if !frac.is_empty() {
        out.push(b'.');
        out.extend_from_slice(frac);
    }
    true
}

/// ECMAScript's `Number.prototype.toString` layout for a decimal's digits.
fn write_decimal(d: &Decimal, out: &mut Vec<u8>) {
    let digits = d.digits.as_slice();
    if digits.is_empty() {
        out.push(b'0');
        return;
    }
    if d.negative {
        out.push(b'-');
    }
    let (n, k) = (d.point, digits.len() as i64); // the decimal point sits after `n` digits
    if k <= n && n <= 21 {
        out.extend_from_slice(digits);
        out.extend(core::iter::repeat_n(b'0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        let (int, frac) = digits.split_at(n as usize);
        out.extend_from_slice(int);
        out.push(b'.');
        out.extend_from_slice(frac);
    } else if -6 < n && n <= 0 {
        out.extend_from_slice(b"0.");
        out.extend(core::iter::repeat_n(b'0', n.unsigned_abs() as usize));
        out.extend_from_slice(digits);
    } else {
        let (first, rest) = digits.split_at(1);
        out.extend_from_slice(first);
        if !rest.is_empty() {
            out.push(b'.');
            out.extend_from_slice(rest);
        }
        out.push(b'e');
        out.push(if n - 1 < 0 { b'-' } else { b'+' });
        out.extend_from_slice(crate::text::decimal((n - 1).unsigned_abs()).as_bytes());
    }
}

/// Decodes the escape at the start of `tail` (which begins with a backslash): the code point and
/// the escape's length in bytes. `None` on a malformed escape or a lone surrogate.
fn decode_escape(tail: &[u8]) -> Option<(u32, usize)> {
    let simple = |cp| Some((cp, 2));
    match tail.get(1)? {
        b'"' => simple(0x22),
        b'\\' => simple(0x5c),
        b'/' => simple(0x2f),
        b'b' => simple(0x08),
        b'f' => simple(0x0c),
        b'n' => simple(0x0a),
        b'r' => simple(0x0d),
        b't' => simple(0x09),
        b'u' => {
            let unit = hex4(tail.get(2..6)?)?;
            match unit {
                0xd800..=0xdbff => {
                    if tail.get(6..8)? != b"\\u" {
                        return None;
                    }
                    let low = hex4(tail.get(8..12)?)?;
                    if !(0xdc00..=0xdfff).contains(&low) {
                        return None;
                    }
                    Some((0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00), 12))
                }
                0xdc00..=0xdfff => None,
                _ => Some((unit, 6)),
            }
        }
        _ => None,
    }
}

fn hex4(digits: &[u8]) -> Option<u32> {
    digits.iter().try_fold(0u32, |v, &d| {
        let n = (d as char).to_digit(16)?;
        Some(v * 16 + n)
    })
}

fn push_utf8(out: &mut Vec<u8>, cp: u32) {
    if let Some(ch) = char::from_u32(cp) {
        let mut buf = [0u8; 4];
        out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
    }
}

/// Copies a string's raw content to `out`: runs without a backslash (valid UTF-8 with no control
/// characters, as the parser checked) in bulk, each escape decoded and written by `escape`.
fn walk_string(raw: &[u8], out: &mut Vec<u8>, escape: fn(u32, &mut Vec<u8>)) -> Option<()> {
    let mut rest = raw;
    // Inside validated content the only special byte left is the backslash.
    while let Some(at) = find_string_special(rest) {
        let (plain, tail) = rest.split_at(at);
        out.extend_from_slice(plain);
        let (cp, len) = decode_escape(tail)?;
        escape(cp, out);
        rest = tail.get(len..)?;
    }
    out.extend_from_slice(rest);
    Some(())
}

/// A string's decoded UTF-8 bytes.
fn decode_string(raw: &[u8], out: &mut Vec<u8>) -> Option<()> {
    walk_string(raw, out, |cp, out| push_utf8(out, cp))
}

/// Writes one decoded code point with the escapes RFC 8785 requires.
fn write_escaped_code_point(cp: u32, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match cp {
        0x22 => out.extend_from_slice(b"\\\""),
        0x5c => out.extend_from_slice(b"\\\\"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        0x0a => out.extend_from_slice(b"\\n"),
        0x0d => out.extend_from_slice(b"\\r"),
        0x09 => out.extend_from_slice(b"\\t"),
        0..=0x1f => {
            out.extend_from_slice(b"\\u00");
            out.push(HEX.get((cp >> 4) as usize).copied().unwrap_or(b'0'));
            out.push(HEX.get((cp & 0xf) as usize).copied().unwrap_or(b'0'));
        }
        _ => push_utf8(out, cp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    fn canon(s: &str) -> Result<String, NotCacheable> {
        Canonicalizer::new().canonical_json(s.as_bytes())
    }

    fn key(tenant: &str, body: &str) -> Result<CacheKey, NotCacheable> {
        cache_key(&KeyRequest {
            tenant: tenant.as_bytes(),
            endpoint: "/v1/chat/completions",
            body: body.as_bytes(),
            opt_in: OptIn::Default,
        })
    }

    #[test]
    fn only_temperature_and_n_decide_determinism() {
        let msgs = r#""messages":[{"role":"user","content":"hi"}]"#;
        // Other numbers beside temperature 0 (max_tokens, top_p, seed) leave it cacheable.
        let with_numbers = format!(
            r#"{{"model":"m","temperature":0,"max_tokens":100,"top_p":0.5,"seed":7,{msgs}}}"#
        );
        assert!(key("t", &with_numbers).is_ok());
        // `n: null` is the default (one choice); `n: 1` too; anything else is not.
        for n in ["null", "1", "1.0"] {
            let body = format!(r#"{{"model":"m","temperature":0,"n":{n},{msgs}}}"#);
            assert!(key("t", &body).is_ok(), "n: {n}");
        }
        for n in ["2", "-1", "\"1\"", "true", "[1]"] {
            let body = format!(r#"{{"model":"m","temperature":0,"n":{n},{msgs}}}"#);
            assert_eq!(
                key("t", &body),
                Err(NotCacheable::NonDeterministic),
                "n: {n}"
            );
        }
        // A temperature that is not a number is not 0.
        let text = format!(r#"{{"model":"m","temperature":"0",{msgs}}}"#);
        assert_eq!(key("t", &text), Err(NotCacheable::NonDeterministic));
    }

    #[test]
    fn swar_scan_finds_the_first_special_byte() {
        for len in 0..20 {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut bytes = std::vec![b'a'; len];
                    // Fill after `at` with a mix, to catch borrows and later hits.
                    for (i, slot) in bytes.iter_mut().enumerate().skip(at + 1) {
                        *slot = [b'"', 0x01, 0xff, b'\\', b'z'][i % 5];
                    }
                    bytes[at] = b;
                    let naive = bytes
                        .iter()
                        .position(|&c| c == b'"' || c == b'\\' || c < 0x20);
                    assert_eq!(find_string_special(&bytes), naive, "{bytes:?}");
                }
            }
        }
    }

    #[test]
    fn short_escapes_are_kept_and_lone_low_surrogates_refused() {
        // RFC 8785: \b \f \n \r \t keep their two-character escapes (not \u00XX).
        assert_eq!(
            canon(r#""\b\f\n\r\t\u0008\u000C""#).as_deref(),
            Ok(r#""\b\f\n\r\t\b\f""#)
        );
        assert_eq!(canon(r#""\/""#).as_deref(), Ok(r#""/""#));
        assert!(matches!(
            canon(r#""\udc00""#),
            Err(NotCacheable::Malformed { .. })
        ));
    }

    #[test]
    fn integers_past_twenty_one_digits_take_the_exponent_form() {
        assert_eq!(
            canon("100000000000000000000").as_deref(),
            Ok("100000000000000000000")
        );
        assert_eq!(canon("1000000000000000000000").as_deref(), Ok("1e+21"));
        assert_eq!(canon("-1000000000000000000000").as_deref(), Ok("-1e+21"));
        assert_eq!(canon("-5").as_deref(), Ok("-5"));
        assert_eq!(canon("-0").as_deref(), Ok("0"));
    }

    #[test]
    fn rfc8785_numbers() {
        let cases = [
            ("0", "0"),
            ("-0", "0"),
            ("-0.0", "0"),
            ("1.0", "1"),
            ("1e2", "100"),
            ("1E+2", "100"),
            ("0.5", "0.5"),
            ("1e21", "1e+21"),
            ("1e20", "100000000000000000000"),
            ("1e-6", "0.000001"),
            ("1e-7", "1e-7"),
            // Past 15 significant digits every digit is kept (RFC 8785 would round to the double).
            ("123456789012345678", "123456789012345678"),
            ("4.50", "4.5"),
            ("2e-3", "0.002"),
            ("-1.5e300", "-1.5e+300"),
            ("9007199254740993", "9007199254740993"),
            ("333333333.33333329", "333333333.33333329"),
            ("0.30000000000000004", "0.30000000000000004"),
            ("1.000000000000000000", "1"),
            ("10e-1", "1"),
            ("0.000e99999999999999999999", "0"),
            ("-12.5e-2", "-0.125"),
            ("1.7976931348623157e308", "1.7976931348623157e+308"),
            ("0.000001", "0.000001"),
            ("0.0000001", "1e-7"),
            ("-0.0000015", "-0.0000015"),
            ("123.4560", "123.456"),
            ("-0.25", "-0.25"),
            ("-7.000", "-7"),
            ("0.1234567890123456", "0.1234567890123456"),
            ("5e-324", "5e-324"),
        ];
        for (input, want) in cases {
            assert_eq!(canon(input).as_deref(), Ok(want), "{input}");
        }
        assert!(matches!(
            canon("1e400"),
            Err(NotCacheable::Malformed { .. })
        ));
    }

    #[test]
    fn plain_decimal_fast_path_agrees_with_the_general_path() {
        let mut rng = fastrand::Rng::with_seed(5);
        for _ in 0..20_000 {
            let scale = 10f64.powi(rng.i32(-7..16));
            let v = (rng.f64() - 0.5) * scale;
            for text in [
                std::format!("{v}"),
                std::format!("{v:.3}"),
                std::format!("{v:.1}"),
            ] {
                let (negative, digits) = match text.as_bytes().split_first() {
                    Some((b'-', rest)) => (true, rest),
                    _ => (false, text.as_bytes()),
                };
                let mut fast = Vec::new();
                if write_plain_decimal(negative, digits, &mut fast) {
                    let mut general = Vec::new();
                    write_decimal(&decimal(text.as_bytes()).unwrap(), &mut general);
                    assert_eq!(fast, general, "{text}");
                }
            }
        }
    }

    /// Up to 15 significant digits, the canonical form is RFC 8785's: the shortest decimal that
    /// round-trips through the number's double, which Rust's `{:e}` also prints.
    #[test]
    fn short_numbers_match_the_shortest_round_trip_of_their_double() {
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..20_000 {
            let mantissa = rng.u64(1..1_000_000_000_000_000);
            let exponent = rng.i32(-300..290);
            let text = std::format!("{}{mantissa}e{exponent}", if rng.bool() { "-" } else { "" });
            let v: f64 = text.parse().unwrap();
            let mut ours = Vec::new();
            write_number(text.as_bytes(), &mut ours).unwrap();
            let ours = String::from_utf8(ours).unwrap();
            // Rust's shortest round-trip digits, laid out the same way.
            let shortest = std::format!("{:e}", v.abs());
            let (m, e) = shortest.split_once('e').unwrap();
            let mut want = Vec::new();
            write_decimal(
                &decimal(std::format!("{}{m}e{e}", if v < 0.0 { "-" } else { "" }).as_bytes())
                    .unwrap(),
                &mut want,
            );
            assert_eq!(ours, String::from_utf8(want).unwrap(), "{text}");
        }
    }

    #[test]
    fn rfc8785_strings_and_order() {
        assert_eq!(
            canon(r#"{"b":1,"a":"\u0041\n\u001f\/\"","c":[true,false,null]}"#).as_deref(),
            Ok(r#"{"a":"A\n\u001f/\"","b":1,"c":[true,false,null]}"#)
        );
        // RFC 8785 §3.2.3's example: UTF-16 code unit order puts the surrogate pair of U+1F600
        // (0xD83D 0xDE00) before U+FB33, unlike UTF-8 byte order.
        assert_eq!(
            canon(r#"{"\u20ac":1,"\r":2,"\ufb33":3,"1":4,"\ud83d\ude00":5,"\u0080":6,"\u00f6":7}"#)
                .as_deref(),
            Ok("{\"\\r\":2,\"1\":4,\"\u{80}\":6,\"\u{f6}\":7,\"\u{20ac}\":1,\"\u{1F600}\":5,\"\u{FB33}\":3}")
        );
        assert_eq!(canon(r#""\ud83d\ude00""#).as_deref(), Ok("\"\u{1F600}\""));
    }

    #[test]
    fn malformed_inputs_are_not_cacheable() {
        for bad in [
            "",
            " ",
            "{",
            "}",
            "[1,]",
            "{\"a\":}",
            "{\"a\" 1}",
            "01",
            "1.",
            "-",
            "1e",
            "tru",
            "\"abc",
            "\"\\x\"",
            "\"\\u12\"",
            "\"\\ud800\"",
            "{\"a\":1}x",
            "{'a':1}",
            "NaN",
            "{\"a\":1]",
            "[1}",
            "[1 2]",
            "{\"a\":[1}}",
        ] {
            assert!(
                matches!(canon(bad), Err(NotCacheable::Malformed { .. })),
                "{bad:?} gave {:?}",
                canon(bad)
            );
        }
        assert!(matches!(
            Canonicalizer::new().canonical_json(b"{\"a\":\"\xff\"}"),
            Err(NotCacheable::Malformed { at: 6 })
        ));
        assert_eq!(canon("{\"a\":1,\"a\":2}"), Err(NotCacheable::DuplicateKey));
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(canon(&deep), Err(NotCacheable::TooDeep));
    }

    #[test]
    fn nesting_is_refused_one_level_past_max_depth() {
        // The outermost value is at depth 0: MAX_DEPTH + 1 nested arrays reach depth MAX_DEPTH.
        let nested = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        assert!(canon(&nested(MAX_DEPTH + 1)).is_ok());
        assert_eq!(canon(&nested(MAX_DEPTH + 2)), Err(NotCacheable::TooDeep));
        assert!(canon(&nested(1)).is_ok());
    }

    #[test]
    fn equivalent_requests_share_a_key() {
        let a = key(
            "t1",
            r#"{"model":"deepseek-chat","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#,
        );
        let b = key(
            "t1",
            r#" { "messages" : [ {"content":"hi","role":"user"} ], "temperature" : 0.0,
                 "model":"deepseek-chat", "user":"alice", "metadata":{"trace":"x"} } "#,
        );
        assert!(a.is_ok());
        assert_eq!(a, b);
    }

    #[test]
    fn tenants_endpoints_and_content_separate_keys() {
        let body = r#"{"model":"m","temperature":0,"messages":[]}"#;
        assert_ne!(key("t1", body), key("t2", body));
        assert_ne!(
            key("t1", body),
            key("t1", r#"{"model":"m2","temperature":0,"messages":[]}"#)
        );
        let other_endpoint = cache_key(&KeyRequest {
            tenant: b"t1",
            endpoint: "/v1/completions",
            body: body.as_bytes(),
            opt_in: OptIn::Default,
        });
        assert_ne!(key("t1", body), other_endpoint);
        // Stream and non-stream answers are stored in different formats.
        assert_ne!(
            key("t1", body),
            key(
                "t1",
                r#"{"model":"m","temperature":0,"messages":[],"stream":true}"#
            )
        );
    }

    #[test]
    fn cacheability_rule() {
        assert_eq!(
            key("t", r#"{"model":"m","messages":[]}"#),
            Err(NotCacheable::NonDeterministic)
        );
        assert_eq!(
            key("t", r#"{"model":"m","temperature":0.7,"messages":[]}"#),
            Err(NotCacheable::NonDeterministic)
        );
        assert_eq!(
            key("t", r#"{"model":"m","temperature":0,"n":3,"messages":[]}"#),
            Err(NotCacheable::NonDeterministic)
        );
        assert!(key("t", r#"{"model":"m","temperature":0,"n":1,"messages":[]}"#).is_ok());
        // Any spelling of zero and one counts; near misses do not.
        assert!(key("t", r#"{"model":"m","temperature":-0.0e3,"n":10E-1}"#).is_ok());
        for (temperature, n) in [("1e-30", "1"), ("0", "1.0000000000000000001"), ("0", "-1")] {
            let body = std::format!(r#"{{"model":"m","temperature":{temperature},"n":{n}}}"#);
            assert_eq!(
                key("t", &body),
                Err(NotCacheable::NonDeterministic),
                "{body}"
            );
        }
        let forced = cache_key(&KeyRequest {
            tenant: b"t",
            endpoint: "/v1/chat/completions",
            body: br#"{"model":"m","temperature":1.3}"#,
            opt_in: OptIn::Always,
        });
        assert!(forced.is_ok());
        let never = cache_key(&KeyRequest {
            tenant: b"t",
            endpoint: "/v1/chat/completions",
            body: br#"{"model":"m","temperature":0}"#,
            opt_in: OptIn::Never,
        });
        assert_eq!(never, Err(NotCacheable::OptedOut));
        assert_eq!(key("t", "[1,2]"), Err(NotCacheable::NotAnObject));
    }

    #[test]
    fn key_display_is_32_hex_digits() {
        let k = key("t", r#"{"temperature":0}"#).map(|k| format!("{k}"));
        assert_eq!(k.as_ref().map(String::len), Ok(32));
    }
}
