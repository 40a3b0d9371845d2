//! The OpenTelemetry GenAI histograms on real Envoy (`docs/metrics.md`): requests through the
//! filter (`make filter`) to a busy primary and a healthy backup (emulators), then
//! `/stats/prometheus` must show `gen_ai_client_operation_duration_milliseconds`,
//! `gen_ai_client_operation_time_to_first_chunk_milliseconds` (streams only) and
//! `gen_ai_client_token_usage` with the labels dashboards filter on, counts equal to the
//! requests sent, token sums equal to the usage the emulator reported, and the OpenTelemetry
//! bucket boundaries.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use unbusy_tests::harness::chat;
use unbusy_tests::scenario::FaultWindow;
use unbusy_tests::world::{healthy, test_config, World};

/// One sample of the Prometheus text format: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        // (Label values here never hold `",`.)
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once("=\"").unwrap();
            map.insert(k.to_string(), v.trim_end_matches('"').to_string());
        }
        out.push((name.to_string(), map, value.parse().unwrap_or(f64::NAN)));
    }
    out
}

/// The value of the one sample named `name` whose labels include `labels` and no `le`.
fn value(all: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<f64> = all
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && !l.contains_key("le")
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .collect();
    assert!(found.len() <= 1, "{name} {labels:?}: {found:?}");
    found.first().copied()
}

/// The `le` bounds of a histogram's series.
fn bounds(all: &[Sample], name: &str, labels: &[(&str, &str)]) -> Vec<String> {
    all.iter()
        .filter(|(n, l, _)| {
            n == &format!("{name}_bucket")
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, l, _)| l["le"].clone())
        .collect()
}

/// `usage` of a JSON answer, or of the SSE chunk that carries it.
fn usage_of(body: &str) -> (u64, u64) {
    let read = |v: &Value| {
        let u = &v["usage"];
        (
            u["prompt_tokens"].as_u64().unwrap(),
            u["completion_tokens"].as_u64().unwrap(),
        )
    };
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        return read(&v);
    }
    let chunk = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .unwrap_or_else(|| panic!("no usage chunk in {body}"));
    read(&chunk)
}

/// Envoy histogram sums come from its log-linear bins (two significant digits), not from the
/// exact values: within 5% (plus half a unit per sample) of the true sum.
fn near(sum: f64, want: u64, samples: u64) -> bool {
    (sum - want as f64).abs() <= 0.05 * want as f64 + 0.5 * samples as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_genai_histograms_count_what_was_sent_with_their_labels() {
    let mut primary = healthy("primary", [30.0, 60.0], [120.0, 200.0]);
    primary.provider.faults = vec![FaultWindow {
        from_s: 0.0,
        to_s: 1e9,
        busy_503: 1.0,
        ..FaultWindow::default()
    }];
    let backup = healthy("backup", [30.0, 60.0], [120.0, 200.0]);
    let w = World::start(vec![primary, backup], &test_config(&json!({})), 1)
        .await
        .unwrap();

    // Answers (failed over to the backup), with a model whose name has dots.
    let (mut input, mut output) = (0, 0);
    for i in 0..3 {
        let body = json!({"model": "gpt-4.1", "temperature": 0.7,
            "messages": [{"role": "user", "content": format!("question number {i}")}]});
        let r = chat(w.envoy.listen, &body.to_string(), &[]).await.unwrap();
        assert_eq!(r.status, 200);
        let (i, o) = usage_of(&r.text());
        (input, output) = (input + i, output + o);
    }
    // Streams asking for their usage.
    let (mut s_input, mut s_output) = (0, 0);
    for i in 0..2 {
        let body = json!({"model": "deepseek-v3.2", "stream": true,
            "stream_options": {"include_usage": true}, "temperature": 0.7,
            "messages": [{"role": "user", "content": format!("a streamed question {i}")}]});
        let r = chat(w.envoy.listen, &body.to_string(), &[]).await.unwrap();
        assert_eq!(r.status, 200);
        let text = r.text();
        assert!(text.contains("data: [DONE]"), "{text}");
        let (i, o) = usage_of(&text);
        (s_input, s_output) = (s_input + i, s_output + o);
    }
    assert!(input > 0 && output > 0 && s_input > 0 && s_output > 0);
    // One that gets no answer: the caller's 1 ms deadline passes first.
    let body = json!({"model": "in-a-hurry", "temperature": 0.7,
        "messages": [{"role": "user", "content": "no time"}]});
    let r = chat(
        w.envoy.listen,
        &body.to_string(),
        &[("x-unbusy-deadline-ms", "1")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 504, "{}", r.text());

    // Envoy merges workers' histograms at its stats flush (every 5 s): wait for both models.
    let duration = "gen_ai_client_operation_duration_milliseconds";
    let chat_backup = [
        ("gen_ai_operation_name", "chat"),
        ("gen_ai_provider_name", "backup"),
    ];
    let with = |model: &'static str, extra: &[(&'static str, &'static str)]| {
        let mut l = chat_backup.to_vec();
        l.push(("gen_ai_request_model", model));
        l.extend_from_slice(extra);
        l
    };
    let until = Instant::now() + Duration::from_secs(60);
    let all = loop {
        let text = w.envoy.admin_text("/stats/prometheus").await.unwrap();
        let all = samples(&text);
        let counted = |m| value(&all, &format!("{duration}_count"), &with(m, &[]));
        let failed = value(
            &all,
            &format!("{duration}_count"),
            &[
                ("gen_ai_request_model", "in-a-hurry"),
                ("error_type", "deadline_exceeded"),
            ],
        );
        if counted("gpt-4.1") == Some(3.0)
            && counted("deepseek-v3.2") == Some(2.0)
            && failed == Some(1.0)
        {
            break all;
        }
        assert!(
            Instant::now() < until,
            "GenAI histograms not flushed:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Only the request that got no answer has `error_type`, and no usage.
    assert!(
        all.iter()
            .filter(|(n, l, _)| n.starts_with("gen_ai_") && l.contains_key("error_type"))
            .all(|(n, l, _)| n.starts_with(duration)
                && l.get("gen_ai_request_model").map(String::as_str) == Some("in-a-hurry")),
        "an unexpected error_type series"
    );
    // Time to first chunk: the streams only.
    let ttfc = "gen_ai_client_operation_time_to_first_chunk_milliseconds";
    assert_eq!(
        value(&all, &format!("{ttfc}_count"), &with("deepseek-v3.2", &[])),
        Some(2.0)
    );
    assert_eq!(
        value(&all, &format!("{ttfc}_count"), &with("gpt-4.1", &[])),
        None
    );
    // Token usage by type, summing what the emulator reported.
    let tokens = "gen_ai_client_token_usage";
    for (model, n, input, output) in [
        ("gpt-4.1", 3u32, input, output),
        ("deepseek-v3.2", 2, s_input, s_output),
    ] {
        for (kind, want) in [("input", input), ("output", output)] {
            let labels = with(model, &[("gen_ai_token_type", kind)]);
            assert_eq!(
                value(&all, &format!("{tokens}_count"), &labels),
                Some(f64::from(n)),
                "{model} {kind}"
            );
            let sum = value(&all, &format!("{tokens}_sum"), &labels).unwrap();
            assert!(
                near(sum, want, n.into()),
                "{model} {kind}: {sum} for {want}"
            );
        }
    }
    // OpenTelemetry's boundaries: tokens 1 to 4^13, latencies 10 ms to minutes.
    let token_bounds = bounds(
        &all,
        tokens,
        &with("gpt-4.1", &[("gen_ai_token_type", "input")]),
    );
    for le in ["1", "4", "16", "1024", "67108864", "+Inf"] {
        assert!(
            token_bounds.iter().any(|b| b == le),
            "{le}: {token_bounds:?}"
        );
    }
    let duration_bounds = bounds(&all, duration, &with("gpt-4.1", &[]));
    for le in ["10", "20", "2560", "81920", "327680", "+Inf"] {
        assert!(
            duration_bounds.iter().any(|b| b == le),
            "{le}: {duration_bounds:?}"
        );
    }
    assert!(
        !duration_bounds.iter().any(|b| b == "0.5"),
        "Envoy's default buckets"
    );
    let ttfc_bounds = bounds(&all, ttfc, &with("deepseek-v3.2", &[]));
    for le in ["1", "100", "10000", "120000"] {
        assert!(ttfc_bounds.iter().any(|b| b == le), "{le}: {ttfc_bounds:?}");
    }

    // unbusy's own counters keep their labels, and Envoy dropped none as a duplicate tag. (Five
    // busy answers, and a sixth if the primary answered the hurried request before its
    // deadline.)
    let busy = value(
        &all,
        "unbusy_attempts_total",
        &[("provider", "primary"), ("result", "busy")],
    );
    assert!(busy == Some(5.0) || busy == Some(6.0), "{busy:?}");
    let log = w.envoy.log_text();
    assert!(!log.contains("Skipping duplicate tag"), "{log}");
}
