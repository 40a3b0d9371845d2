//! The OpenTelemetry GenAI client metrics as Envoy histograms (`docs/metrics.md`):
//! `gen_ai_client_operation_duration_milliseconds`,
//! `gen_ai_client_operation_time_to_first_chunk_milliseconds` (streams only) and
//! `gen_ai_client_token_usage` (`gen_ai_token_type` input and output, from the answer's
//! `usage`), each labelled `gen_ai_operation_name` (always `chat`), `gen_ai_provider_name`,
//! `gen_ai_request_model` and, for requests that failed, `error_type`.
//!
//! Why milliseconds: Envoy histograms record integers, and whole seconds would lose everything
//! under one; the unit is in the name, as Prometheus naming asks (`docs/metrics.md` maps it to
//! OpenTelemetry's seconds).
//!
//! Why defined lazily: the label values (provider, bounded model, error type) are known only
//! when a request ends, and defining every combination up front would be thousands of stats.
//! Each combination is defined once per VM, the first time it is seen, and its id kept: after
//! that a request costs one hostcall per value recorded and no name is formatted.
//!
//! The stat name carries the labels as `.name.value` segments in a fixed order, the model
//! last: Envoy's tag extraction (rendered by `unbusy-envoy-config`) takes every segment but the
//! model's as `[^.]+` and the model's as the whole rest of the name, so a model with dots
//! (`gpt-4.1`) comes out whole.

use crate::host::{Host, MetricId, MetricKind};
use unbusy_core::genai::{error_type, Usage};
use unbusy_core::ids::ProviderId;
use unbusy_core::time::Nanos;

/// The provider label of a request no provider answered (a cache hit, one refused before any
/// attempt).
pub const NO_PROVIDER: &str = "none";

/// The histograms, for [`GenAiMetrics`]' keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Instrument {
    Duration,
    FirstChunk,
    InputTokens,
    OutputTokens,
}

/// A model's series for one provider and error type: each instrument's id once defined
/// (`Some(None)`: the host refused it).
struct Series {
    provider: Option<ProviderId>,
    error: Option<&'static str>,
    ids: [Option<Option<MetricId>>; 4],
}

/// What a finished request records.
pub struct Finished<'a> {
    /// The provider of its last attempt.
    pub provider: Option<ProviderId>,
    /// Its bounded model label.
    pub model: &'a str,
    /// How it ended.
    pub outcome: unbusy_core::engine::RequestOutcome,
    /// Admission to end.
    pub latency: Nanos,
    /// Admission to a stream's first chunk.
    pub first_chunk: Option<Nanos>,
    /// The answer's token usage.
    pub usage: Option<Usage>,
}

/// The GenAI histograms of one VM.
pub struct GenAiMetrics {
    providers: Vec<String>,
    /// By model label (looked up by `&str`: no allocation once a model was seen). A list: the
    /// labels are bounded (the configuration's models, `MODEL_LABELS_SEEN` others, `_OTHER`),
    /// and a `HashMap` keyed by `String`
    /// cost the filter its own hash table code (issue 13: the filter's size).
    series: Vec<(String, Vec<Series>)>,
}

impl GenAiMetrics {
    /// For these providers (the label is the provider's name). Defines nothing yet.
    pub fn new(providers: &[String]) -> Self {
        Self {
            providers: providers.to_vec(),
            series: Vec::new(),
        }
    }

    /// Records a finished request: one lookup of its series (by model, then provider and error
    /// type), then one hostcall per value.
    pub fn finished(&mut self, host: &impl Host, f: &Finished<'_>) {
        let error = error_type(f.outcome);
        let m = match self.series.iter().position(|(m, _)| m == f.model) {
            Some(m) => m,
            None => {
                self.series.push((f.model.to_string(), Vec::new()));
                self.series.len() - 1
            }
        };
        let Some((_, list)) = self.series.get_mut(m) else {
            return;
        };
        let i = match list
            .iter()
            .position(|s| s.provider == f.provider && s.error == error)
        {
            Some(i) => i,
            None => {
                list.push(Series {
                    provider: f.provider,
                    error,
                    ids: [None; 4],
                });
                list.len() - 1
            }
        };
        let Some(series) = list.get_mut(i) else {
            return;
        };
        let provider = f
            .provider
            .and_then(|p| self.providers.get(p.index()))
            .map_or(NO_PROVIDER, String::as_str);
        let mut record = |what: Instrument, value: u64| {
            let Some(slot) = series.ids.get_mut(what as usize) else {
                return;
            };
            let id = *slot.get_or_insert_with(|| {
                host.define_metric(
                    MetricKind::Histogram,
                    &stat_name(what, provider, error, f.model),
                )
            });
            if let Some(id) = id {
                host.record_metric(id, value);
            }
        };
        let ms = |n: Nanos| n / 1_000_000;
        record(Instrument::Duration, ms(f.latency));
        if let Some(t) = f.first_chunk {
            record(Instrument::FirstChunk, ms(t));
        }
        if let Some(u) = f.usage {
            record(Instrument::InputTokens, u.input);
            record(Instrument::OutputTokens, u.output);
        }
    }
}

/// The Envoy stat name of one series (see the module's documentation for its shape).
fn stat_name(what: Instrument, provider: &str, error: Option<&str>, model: &str) -> String {
    let (metric, token_type) = match what {
        Instrument::Duration => ("gen_ai_client_operation_duration_milliseconds", None),
        Instrument::FirstChunk => (
            "gen_ai_client_operation_time_to_first_chunk_milliseconds",
            None,
        ),
        Instrument::InputTokens => ("gen_ai_client_token_usage", Some("input")),
        Instrument::OutputTokens => ("gen_ai_client_token_usage", Some("output")),
    };
    let mut name = format!("{metric}.gen_ai_operation_name.chat.gen_ai_provider_name.{provider}");
    if let Some(e) = error {
        name.push_str(".error_type.");
        name.push_str(e);
    }
    if let Some(t) = token_type {
        name.push_str(".gen_ai_token_type.");
        name.push_str(t);
    }
    name.push_str(".gen_ai_request_model.");
    name.push_str(model);
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeHost, FakeProcess};
    use unbusy_core::engine::RequestOutcome;

    #[test]
    fn names_carry_the_labels_model_last() {
        assert_eq!(
            stat_name(Instrument::InputTokens, "a", None, "gpt-4.1"),
            "gen_ai_client_token_usage.gen_ai_operation_name.chat.gen_ai_provider_name.a\
             .gen_ai_token_type.input.gen_ai_request_model.gpt-4.1"
        );
        assert_eq!(
            stat_name(Instrument::Duration, "none", Some("shed"), "_OTHER"),
            "gen_ai_client_operation_duration_milliseconds.gen_ai_operation_name.chat\
             .gen_ai_provider_name.none.error_type.shed.gen_ai_request_model._OTHER"
        );
    }

    #[test]
    fn records_each_series_and_defines_it_once() {
        let process = FakeProcess::new(0);
        let host = FakeHost::worker(&process);
        let mut m = GenAiMetrics::new(&["a".into(), "b".into()]);
        let f = Finished {
            provider: Some(ProviderId::new(1)),
            model: "m.1",
            outcome: RequestOutcome::Success,
            latency: 1_500_000_000,
            first_chunk: Some(200_000_000),
            usage: Some(Usage {
                input: 12,
                output: 7,
            }),
        };
        m.finished(&host, &f);
        m.finished(&host, &f);
        let prefix = ".gen_ai_operation_name.chat.gen_ai_provider_name.b";
        let d = format!(
            "gen_ai_client_operation_duration_milliseconds{prefix}.gen_ai_request_model.m.1"
        );
        assert_eq!(process.recorded(&d), vec![1500, 1500]);
        let t = format!(
            "gen_ai_client_operation_time_to_first_chunk_milliseconds{prefix}.gen_ai_request_model.m.1"
        );
        assert_eq!(process.recorded(&t), vec![200, 200]);
        let i = format!(
            "gen_ai_client_token_usage{prefix}.gen_ai_token_type.input.gen_ai_request_model.m.1"
        );
        let o = i.replace("input", "output");
        assert_eq!(process.recorded(&i), vec![12, 12]);
        assert_eq!(process.recorded(&o), vec![7, 7]);
        assert_eq!(process.hostcalls().get("define_metric"), Some(&4));

        // A failure before any attempt, not a stream, no usage: the duration only.
        m.finished(
            &host,
            &Finished {
                provider: None,
                model: "_OTHER",
                outcome: RequestOutcome::Shed,
                latency: 3_000_000,
                first_chunk: None,
                usage: None,
            },
        );
        let shed = "gen_ai_client_operation_duration_milliseconds.gen_ai_operation_name.chat\
                    .gen_ai_provider_name.none.error_type.shed.gen_ai_request_model._OTHER";
        assert_eq!(process.recorded(shed), vec![3]);
        assert_eq!(process.hostcalls().get("define_metric"), Some(&5));
    }
}
