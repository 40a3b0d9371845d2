//! A soak of the filter's heap (`src/heap.rs`, its allocator on wasm) under the filter itself:
//! this test binary's global allocator is that heap, over an arena, and 100,000 requests go
//! through the filter on the fake host (cache misses, cache hits, a provider's 429 failing
//! over to the other). A long-lived VM must not keep growing: once warm (after the first 40,000
//! requests, 400 s of the fake clock) the heap may take at most two more pages to the end.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{worker, ANSWER, T0};
use std::alloc::{GlobalAlloc, Layout};
use std::sync::Mutex;
use std::time::Duration;
use unbusy_envoy::driver;
use unbusy_envoy::fake::FakeProcess;
use unbusy_envoy::heap::{Arena, Heap, PAGE};

/// The heap behind a lock: the test harness has threads, a wasm VM has not.
struct Locked(Mutex<()>, Heap<Arena>);

unsafe impl GlobalAlloc for Locked {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        unsafe { self.1.alloc(layout) }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        let _held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        unsafe { self.1.dealloc(block, layout) }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        unsafe { self.1.realloc(block, layout, new_size) }
    }
}

#[global_allocator]
static HEAP: Locked = Locked(Mutex::new(()), Heap::new(Arena::new(1 << 32)));

fn reserved() -> usize {
    let _held = HEAP.0.lock().unwrap_or_else(|e| e.into_inner());
    HEAP.1.reserved()
}

const CONFIG: &str = r#"{"providers":[
    {"name":"busy","base_url":"http://127.0.0.1:10001","cluster":"unbusy_busy","priority":0},
    {"name":"calm","base_url":"http://127.0.0.1:10002","cluster":"unbusy_calm","priority":1}]}"#;

#[test]
fn the_heap_stops_growing_over_100k_requests() {
    let process = FakeProcess::new(T0);
    let (host, state) = worker(&process, CONFIG, 7);
    let mut sizes = Vec::new();
    let mut outcomes = [0u32; 3];
    for n in 1..=100_000u32 {
        // Context ids are reused (the fake host keeps a stream per id; Envoy forgets them).
        let ctx = n % 512 + 1;
        let body = match n % 10 {
            // The same cacheable prompt: answered from the cache once it is there.
            0 => r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"same"}]}"#
                .to_string(),
            k => format!(
                r#"{{"model":"m","temperature":0.7,"messages":[{{"role":"user","content":"prompt {n:06} {}"}}]}}"#,
                "x".repeat(k as usize * 40)
            ),
        };
        let action = common::chat_request(&host, &state, ctx, "Bearer k", &body);
        if action == proxy_wasm::types::Action::Continue {
            // Every seventh answer is a 429 (the engine fails over), the rest are good.
            let (status, answer) = if n % 7 == 0 {
                ("429", r#"{"error":{"message":"busy"}}"#)
            } else {
                ("200", ANSWER)
            };
            host.edit(ctx, |s| {
                s.response_headers = vec![
                    (":status".into(), status.into()),
                    ("content-type".into(), "application/json".into()),
                ];
            });
            driver::response_headers(&host, &state, ctx, ctx, false);
            host.edit(ctx, |s| s.response_body = answer.as_bytes().to_vec());
            driver::response_body(&host, &state, ctx, ctx, answer.len(), true);
            outcomes[usize::from(status == "429")] += 1;
            // A failover is a call dispatched to the other provider: it answers well.
            for call in host.take_calls() {
                host.set_call_answer(
                    &[(":status", "200"), ("content-type", "application/json")],
                    ANSWER.as_bytes(),
                );
                driver::call_response(&host, &state, call.token.0, ANSWER.len());
            }
        } else {
            outcomes[2] += 1;
        }
        driver::stream_done(&host, &state, ctx);
        host.edit(ctx, |s| *s = Default::default());
        process.advance(Duration::from_millis(10));
        if n % 100 == 0 {
            driver::tick(&host, &state);
            process.forget_records();
        }
        if n % 10_000 == 0 {
            sizes.push(reserved());
        }
    }
    eprintln!("heap size every 10,000 requests: {sizes:?}; outcomes {outcomes:?}");
    assert!(outcomes.iter().all(|&o| o > 1000), "{outcomes:?}");
    // Warm: the first 40,000 requests (400 s of the fake clock) fill the engine's time windows.
    // After that, at most two pages more over 60,000 requests (the heap sits near a page's
    // edge, and the harness's own threads allocate from it too): a lost free is a page every
    // few requests (1.19 GB by the end).
    let warm = sizes[3];
    assert!(
        sizes[9] - warm <= 2 * PAGE,
        "the heap grew after the first 40,000 requests: {sizes:?}"
    );
}
