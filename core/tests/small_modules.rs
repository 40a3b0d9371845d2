//! The small building blocks' contracts that the engine's tests reach only indirectly: a
//! ring's window and clearing, a sorted map's emptiness, the SSE progress scanner's bare-CR
//! line ends and the instant of first progress.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use unbusy_core::progress::{Framing, ProgressDetector};
use unbusy_core::sorted_map::SortedMap;
use unbusy_core::window::Ring;

#[test]
fn a_ring_covers_its_window_and_forgets_everything_when_cleared() {
    let mut ring: Ring<u32, 10> = Ring::new(1_000);
    assert_eq!(ring.window_ns(), 1_000);
    *ring.current(50) += 3;
    *ring.current(150) += 4;
    assert_eq!(ring.fold(150, 0, |a, v| a + v), 7);
    ring.clear();
    assert_eq!(ring.fold(150, 0, |a, v| a + v), 0);
    *ring.current(160) += 1;
    assert_eq!(ring.fold(160, 0, |a, v| a + v), 1);
}

#[test]
fn a_sorted_map_is_empty_until_something_is_in_it() {
    let mut m: SortedMap<u32, u32> = SortedMap::new();
    assert!(m.is_empty());
    m.insert(1, 1);
    assert!(!m.is_empty());
    m.remove(&1);
    assert!(m.is_empty());
}

#[test]
fn sse_lines_ended_by_a_bare_cr_are_read_whole() {
    // A keep-alive comment ended by a lone CR, then a data line: its first byte is not lost.
    let mut d = ProgressDetector::new(Framing::Sse, 0);
    d.feed(5, b": keep-alive\rdata: {\"x\":1}\r");
    assert!(d.has_progressed());
    assert_eq!(d.first_progress_at(), Some(5));
    // CRLF line ends, the progress arriving in a later chunk: its instant is the later one.
    let mut d = ProgressDetector::new(Framing::Sse, 0);
    d.feed(5, b": keep-alive\r\n\r\n");
    assert_eq!(d.first_progress_at(), None);
    d.feed(9, b"data: {\"x\":1}\r\n");
    assert_eq!(d.first_progress_at(), Some(9));
    assert_eq!(d.time_to_first_progress(), Some(9));
}
