//! Reading an answer a provider compressed although it was asked not to.
//!
//! Hosts ask providers for `identity` ([`crate::answer::MANAGED_ACCEPT_ENCODING`]): an answer
//! unbusy judges, caches and watches for keep-alive bytes has to be readable. Some providers,
//! or the CDN in front of them, compress whatever `accept-encoding` says. Passed on as is, the
//! caller gets bytes it may not have asked for, the progress detector sees no `data:` (a
//! healthy stream looks like a stall) and the judge cannot tell an overload body from an
//! answer. So a host decodes such an answer as it arrives and hands the judge, the detector,
//! the cache and the caller the same decoded bytes (without `content-encoding`).
//!
//! [`Decoder`] reads `gzip` (RFC 1952, every member checked against its CRC-32 and length)
//! and `deflate` (RFC 9110: zlib, RFC 1950; a bare RFC 1951 stream is accepted too, as
//! browsers do) incrementally, in chunks split anywhere, with its output bounded per call so
//! a small body cannot expand without limit. Other encodings (`br`, `zstd`) are not read:
//! [`Decoder::for_encoding`] says so and the host treats the answer as unreadable.

use alloc::boxed::Box;
use alloc::vec::Vec;
use miniz_oxide::inflate::stream::{inflate, InflateState};
use miniz_oxide::{DataFormat, MZError, MZFlush, MZStatus};

/// Why an encoded body cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes are not valid for the encoding (bad header, corrupt data, wrong checksum).
    Corrupt,
    /// The body ended before its compressed stream did (a truncated answer).
    Truncated,
    /// Decoding would produce more than the caller's bound.
    TooLarge,
}

/// Whether a `content-encoding` names a compression [`Decoder`] reads.
fn format_of(content_encoding: &str) -> Option<Format> {
    let e = content_encoding.trim();
    if e.eq_ignore_ascii_case("gzip") || e.eq_ignore_ascii_case("x-gzip") {
        Some(Format::Gzip)
    } else if e.eq_ignore_ascii_case("deflate") {
        Some(Format::Deflate)
    } else {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Gzip,
    Deflate,
}

/// Where a gzip decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Reading a member's header (gzip) or the first two bytes (deflate, to tell zlib).
    Header,
    /// Inflating the compressed data.
    Data,
    /// Reading a gzip member's 8-byte trailer.
    Trailer,
    /// Between gzip members: only another member (or nothing) may follow.
    Between,
    /// The deflate stream ended: nothing may follow.
    Ended,
    /// An error was found: every later call fails the same way.
    Failed(DecodeError),
}

/// An incremental decoder for one encoded body.
pub struct Decoder {
    format: Format,
    stage: Stage,
    /// Header or trailer bytes not yet complete.
    pending: Vec<u8>,
    inflate: Box<InflateState>,
    crc: u32,
    size: u32,
}

/// Output is produced in steps of this many bytes.
const STEP: usize = 16 * 1024;

impl Decoder {
    /// A decoder for an answer with this `content-encoding`, or `None` when it is absent,
    /// `identity` (nothing to decode) or an encoding unbusy does not read.
    pub fn for_encoding(content_encoding: Option<&str>) -> Option<Self> {
        let format = format_of(content_encoding?)?;
        Some(Self {
            format,
            stage: Stage::Header,
            pending: Vec::new(),
            inflate: InflateState::new_boxed(DataFormat::Raw),
            crc: 0,
            size: 0,
        })
    }

    /// Decodes the next chunk of the body, appending what it yields to `out` and producing at
    /// most `max_out` bytes in this call.
    pub fn feed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        max_out: usize,
    ) -> Result<(), DecodeError> {
        let limit = out.len().saturating_add(max_out);
        self.feed_until(input, out, limit).inspect_err(|&e| {
            self.stage = Stage::Failed(e);
        })
    }

    /// [`Self::feed`], with `out` bounded at `limit` bytes in all.
    fn feed_until(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), DecodeError> {
        while !input.is_empty() {
            let used = match self.stage {
                Stage::Failed(e) => return Err(e),
                Stage::Header | Stage::Between => {
                    let (used, carried) = self.header(input)?;
                    // Bytes an earlier chunk gave the header that turned out to be data.
                    self.feed_until(&carried, out, limit)?;
                    used
                }
                Stage::Data => self.data(input, out, limit)?,
                Stage::Trailer => self.trailer(input)?,
                Stage::Ended => return Err(DecodeError::Corrupt),
            };
            input = input.get(used..).unwrap_or(&[]);
        }
        Ok(())
    }

    /// The body ended: whether it was a complete encoded body.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.stage {
            Stage::Failed(e) => Err(e),
            Stage::Between | Stage::Ended => Ok(()),
            Stage::Header | Stage::Data | Stage::Trailer => Err(DecodeError::Truncated),
        }
    }

    /// Decodes a whole body at once, producing at most `max_out` bytes.
    pub fn decode_all(
        content_encoding: Option<&str>,
        body: &[u8],
        max_out: usize,
    ) -> Option<Result<Vec<u8>, DecodeError>> {
        let mut decoder = Self::for_encoding(content_encoding)?;
        let mut out = Vec::new();
        Some(
            decoder
                .feed(body, &mut out, max_out)
                .and_then(|()| decoder.finish())
                .map(|()| out),
        )
    }

    /// Consumes header bytes: returns how many of `input` it used, and the bytes gathered from
    /// earlier chunks that follow the header (they belong to the data).
    fn header(&mut self, input: &[u8]) -> Result<(usize, Vec<u8>), DecodeError> {
        // Headers are short: gather them whole, then parse (a chunk may split one anywhere).
        let before = self.pending.len();
        self.pending.extend_from_slice(input);
        let header_len = match self.format {
            Format::Gzip => gzip_header_len(&self.pending)?,
            Format::Deflate => deflate_format(&self.pending).map(|format| {
                self.inflate.reset(format);
                0
            }),
        };
        let Some(header_len) = header_len else {
            return Ok((input.len(), Vec::new())); // need more
        };
        if self.format == Format::Gzip {
            self.inflate.reset(DataFormat::Raw);
            self.crc = 0;
            self.size = 0;
        }
        self.stage = Stage::Data;
        let carried = self
            .pending
            .get(header_len.min(before)..before)
            .unwrap_or(&[])
            .to_vec();
        self.pending.clear();
        Ok((header_len.saturating_sub(before).min(input.len()), carried))
    }

    /// Inflates; returns how many of `input` it used.
    fn data(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<usize, DecodeError> {
        let mut used = 0;
        loop {
            let start = out.len();
            if start >= limit {
                return Err(DecodeError::TooLarge);
            }
            let room = STEP.min(limit - start);
            out.resize(start + room, 0);
            let rest = input.get(used..).unwrap_or(&[]);
            let result = inflate(
                &mut self.inflate,
                rest,
                out.get_mut(start..).unwrap_or(&mut []),
                MZFlush::None,
            );
            out.truncate(start + result.bytes_written);
            used += result.bytes_consumed;
            if self.format == Format::Gzip {
                let written = out.get(start..).unwrap_or(&[]);
                self.crc = crc32(self.crc, written);
                self.size = self.size.wrapping_add(written.len() as u32);
            }
            match result.status {
                Ok(MZStatus::StreamEnd) => {
                    self.stage = match self.format {
                        Format::Gzip => Stage::Trailer,
                        Format::Deflate => Stage::Ended,
                    };
                    return Ok(used);
                }
                Ok(_) | Err(MZError::Buf) => {
                    let all_taken = used >= input.len();
                    if all_taken && result.bytes_written < room {
                        return Ok(used); // wait for more input
                    }
                    if !all_taken && result.bytes_consumed == 0 && result.bytes_written == 0 {
                        return Err(DecodeError::Corrupt); // input left, yet no progress
                    }
                }
                Err(_) => return Err(DecodeError::Corrupt),
            }
        }
    }

    /// Consumes trailer bytes; returns how many of `input` it used.
    fn trailer(&mut self, input: &[u8]) -> Result<usize, DecodeError> {
        let want = 8 - self.pending.len();
        let take = want.min(input.len());
        self.pending
            .extend_from_slice(input.get(..take).unwrap_or(&[]));
        if let Some(t) = self.pending.first_chunk::<8>() {
            let crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
            let size = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
            if crc != self.crc || size != self.size {
                return Err(DecodeError::Corrupt);
            }
            self.pending.clear();
            self.stage = Stage::Between;
        }
        Ok(take)
    }
}

/// The length of a complete gzip member header at the start of `b`, `None` if more bytes
/// are needed.
fn gzip_header_len(b: &[u8]) -> Result<Option<usize>, DecodeError> {
    const FHCRC: u8 = 2;
    const FEXTRA: u8 = 4;
    const FNAME: u8 = 8;
    const FCOMMENT: u8 = 16;
    // A byte not there yet is not wrong: fewer than four bytes wait at `flags` below.
    for (i, expected) in [0x1f_u8, 0x8b, 8].into_iter().enumerate() {
        if b.get(i).is_some_and(|&v| v != expected) {
            return Err(DecodeError::Corrupt);
        }
    }
    let Some(&flags) = b.get(3) else {
        return Ok(None);
    };
    if flags & 0xe0 != 0 {
        return Err(DecodeError::Corrupt);
    }
    let mut at = 10;
    if flags & FEXTRA != 0 {
        let (Some(&lo), Some(&hi)) = (b.get(at), b.get(at + 1)) else {
            return Ok(None);
        };
        at += 2 + usize::from(u16::from_le_bytes([lo, hi]));
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            let Some(nul) = b.get(at..).and_then(|r| r.iter().position(|&c| c == 0)) else {
                return Ok(None);
            };
            at += nul + 1;
        }
    }
    if flags & FHCRC != 0 {
        at += 2;
    }
    Ok((b.len() >= at).then_some(at))
}

/// Whether a `deflate` body is zlib-wrapped (as RFC 9110 says) or a bare deflate stream (as
/// some servers send), from its first two bytes.
fn deflate_format(b: &[u8]) -> Option<DataFormat> {
    let (&cmf, &flg) = (b.first()?, b.get(1)?);
    let zlib = cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0;
    Some(if zlib {
        DataFormat::Zlib
    } else {
        DataFormat::Raw
    })
}

/// CRC-32 (IEEE, as gzip uses), continued from `crc`.
fn crc32(crc: u32, bytes: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in bytes {
        let index = usize::from((c as u8) ^ b);
        c = CRC_TABLE.get(index).copied().unwrap_or(0) ^ (c >> 8);
    }
    !c
}

// Evaluated at compile time: an index out of bounds would fail the build, never panic.
#[allow(clippy::indexing_slicing)]
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut c = n as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[n] = c;
        n += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
    use flate2::Compression;
    use std::io::Write;

    fn answer() -> Vec<u8> {
        let mut s = String::new();
        for i in 0..400 {
            s.push_str(&alloc::format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"token {i} 服务\"}}}}]}}\n\n"
            ));
        }
        s.push_str("data: [DONE]\n\n");
        s.into_bytes()
    }

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    fn decode_in_chunks(encoding: &str, body: &[u8], chunk: usize) -> Result<Vec<u8>, DecodeError> {
        let mut d = Decoder::for_encoding(Some(encoding)).unwrap();
        let mut out = Vec::new();
        for piece in body.chunks(chunk.max(1)) {
            d.feed(piece, &mut out, 1 << 20)?;
        }
        d.finish().map(|()| out)
    }

    #[test]
    fn only_the_compressions_it_reads_get_a_decoder() {
        for e in ["gzip", "x-gzip", " GZIP ", "deflate"] {
            assert!(Decoder::for_encoding(Some(e)).is_some(), "{e}");
        }
        for e in [
            None,
            Some("identity"),
            Some("br"),
            Some("zstd"),
            Some(""),
            Some("gzip, br"),
        ] {
            assert!(Decoder::for_encoding(e).is_none(), "{e:?}");
        }
    }

    #[test]
    fn gzip_zlib_and_bare_deflate_decode_however_the_body_is_split() {
        let plain = answer();
        let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
        z.write_all(&plain).unwrap();
        let mut raw = DeflateEncoder::new(Vec::new(), Compression::fast());
        raw.write_all(&plain).unwrap();
        let bodies = [
            ("gzip", gzip(&plain)),
            ("deflate", z.finish().unwrap()),
            ("deflate", raw.finish().unwrap()),
        ];
        for (encoding, body) in &bodies {
            for chunk in [1, 2, 3, 7, 10, 11, 64, 1000, body.len()] {
                let got = decode_in_chunks(encoding, body, chunk);
                assert_eq!(
                    got.as_deref(),
                    Ok(&plain[..]),
                    "{encoding} in chunks of {chunk}"
                );
            }
        }
    }

    #[test]
    fn a_gzip_header_with_every_optional_field_and_two_members_decode() {
        let plain = answer();
        let mut header = alloc::vec![0x1f, 0x8b, 8, 2 | 4 | 8 | 16, 0, 0, 0, 0, 0, 255];
        header.extend_from_slice(&[3, 0, b'a', b'b', b'c']); // FEXTRA
        header.extend_from_slice(b"name\0comment\0");
        header.extend_from_slice(&[0, 0]); // FHCRC (not checked)
        let member = gzip(&plain[..100]);
        let mut body = header;
        body.extend_from_slice(member.get(10..).unwrap());
        body.extend_from_slice(&gzip(&plain[100..]));
        for chunk in [1, 5, 13, body.len()] {
            assert_eq!(
                decode_in_chunks("gzip", &body, chunk).as_deref(),
                Ok(&plain[..])
            );
        }
    }

    #[test]
    fn an_extra_field_alone_is_skipped_by_its_stated_length() {
        let plain = answer();
        let member = gzip(&plain);
        for extra in [&b""[..], b"x", b"abcde"] {
            let mut body = alloc::vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255];
            let len = u16::try_from(extra.len()).unwrap().to_le_bytes();
            body.extend_from_slice(&len);
            body.extend_from_slice(extra);
            body.extend_from_slice(member.get(10..).unwrap());
            for chunk in [1, 12, body.len()] {
                assert_eq!(
                    decode_in_chunks("gzip", &body, chunk).as_deref(),
                    Ok(&plain[..]),
                    "an extra field of {} bytes, in chunks of {chunk}",
                    extra.len()
                );
            }
        }
    }

    #[test]
    fn deflate_is_read_as_zlib_only_behind_a_valid_zlib_header() {
        // CM 8, a window of at most 32 KiB (CINFO <= 7) and a check that makes the first two
        // bytes a multiple of 31 (RFC 1950); anything else is a bare deflate stream.
        for zlib in [[0x78, 0x9c], [0x78, 0x01], [0x78, 0xda], [0x08, 0x1d]] {
            assert_eq!(deflate_format(&zlib), Some(DataFormat::Zlib), "{zlib:02x?}");
        }
        for raw in [
            [0x78, 0x9d], // the check fails
            [0x79, 0x18], // CM 9 with a good check
            [0x88, 0x98], // CINFO 8 with a good check: a window too large for zlib
            [0x0b, 0x2f], // a bare deflate block's first bytes
        ] {
            assert_eq!(deflate_format(&raw), Some(DataFormat::Raw), "{raw:02x?}");
        }
        assert_eq!(deflate_format(&[0x78]), None);
    }

    #[test]
    fn a_truncated_body_never_decodes_as_complete() {
        let plain = answer();
        let body = gzip(&plain);
        for cut in 0..body.len() {
            let got = decode_in_chunks("gzip", body.get(..cut).unwrap(), 97);
            assert!(got.is_err(), "cut at {cut} of {}", body.len());
        }
    }

    #[test]
    fn a_wrong_checksum_or_length_or_junk_is_corrupt() {
        let body = gzip(&answer());
        let n = body.len();
        for at in [n - 8, n - 1] {
            let mut bad = body.clone();
            bad[at] ^= 1;
            assert_eq!(
                decode_in_chunks("gzip", &bad, 50),
                Err(DecodeError::Corrupt),
                "byte {at}"
            );
        }
        let mut trailing = body.clone();
        trailing.push(0);
        assert!(decode_in_chunks("gzip", &trailing, 50).is_err());
        assert_eq!(
            decode_in_chunks("gzip", b"<html>not gzip</html>", 4),
            Err(DecodeError::Corrupt)
        );
        // A failed decoder stays failed.
        let mut d = Decoder::for_encoding(Some("gzip")).unwrap();
        let mut out = Vec::new();
        assert!(d.feed(b"junk", &mut out, 100).is_err());
        assert!(d.feed(&body, &mut out, 1 << 20).is_err());
    }

    #[test]
    fn output_is_bounded_so_a_small_body_cannot_expand_without_limit() {
        let zeros = alloc::vec![0u8; 8 << 20];
        let bomb = gzip(&zeros);
        assert!(bomb.len() < 64 * 1024);
        assert_eq!(
            Decoder::decode_all(Some("gzip"), &bomb, 1 << 20),
            Some(Err(DecodeError::TooLarge))
        );
        let mut d = Decoder::for_encoding(Some("gzip")).unwrap();
        let mut out = Vec::new();
        assert_eq!(d.feed(&bomb, &mut out, 100_000), Err(DecodeError::TooLarge));
        assert!(out.len() <= 100_000);
    }
}
