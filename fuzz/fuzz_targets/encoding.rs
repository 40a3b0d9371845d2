//! Compressed answer bytes as the hosts decode them (`encoding::Decoder`): nothing may panic,
//! the output never passes its bound, the result does not depend on how the body was split
//! into chunks, and whatever is compressed (gzip or zlib) decodes back to itself.
#![no_main]

use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use unbusy_core::encoding::{DecodeError, Decoder};

const BOUND: usize = 1 << 20;

fn decode(encoding: &str, body: &[u8], split: usize) -> Result<Vec<u8>, DecodeError> {
    let mut d = Decoder::for_encoding(Some(encoding)).expect("a decoder");
    let mut out = Vec::new();
    let (a, b) = body.split_at(split.min(body.len()));
    d.feed(a, &mut out, BOUND)?;
    assert!(out.len() <= BOUND);
    let before = out.len();
    d.feed(b, &mut out, BOUND)?;
    assert!(out.len() - before <= BOUND);
    d.finish().map(|()| out)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let split = usize::from(split) * 3;
    for encoding in ["gzip", "deflate"] {
        // Arbitrary bytes: the same verdict and output however they are split.
        let whole = Decoder::decode_all(Some(encoding), rest, 2 * BOUND).expect("a decoder");
        let parts = decode(encoding, rest, split);
        if let (Ok(w), Ok(p)) = (&whole, &parts) {
            assert_eq!(w, p, "{encoding}: output depends on the split");
        }
        assert_eq!(
            whole.is_ok(),
            parts.is_ok() || parts == Err(DecodeError::TooLarge)
        );
    }
    // Real compressed bodies decode back to what was compressed.
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(rest).expect("in memory");
    let gz = gz.finish().expect("in memory");
    assert_eq!(decode("gzip", &gz, split).as_deref(), Ok(rest));
    let mut z = ZlibEncoder::new(Vec::new(), Compression::fast());
    z.write_all(rest).expect("in memory");
    let z = z.finish().expect("in memory");
    assert_eq!(decode("deflate", &z, split).as_deref(), Ok(rest));
});
