//! A small SVG chart of simulator reports: per scenario, success rate and attempts per
//! request for each policy, as grouped bars. Written by hand (plain SVG text) so the harness
//! needs no font or image libraries.

use crate::sim::report::Report;
use std::fmt::Write;

/// One panel: its title, its axis maximum, the value plotted and how to label it.
struct Panel<'a> {
    title: &'a str,
    max: f64,
    value: fn(&Report) -> f64,
    label: fn(f64) -> String,
}

const COLOURS: [&str; 8] = [
    "#9e9e9e", "#e57373", "#ffb74d", "#64b5f6", "#2e7d32", "#81c784", "#ba68c8", "#4db6ac",
];

/// Renders the chart.
pub fn svg_chart(reports: &[Report]) -> String {
    let mut scenarios: Vec<&str> = Vec::new();
    let mut policies: Vec<&str> = Vec::new();
    for r in reports {
        if !scenarios.contains(&r.scenario.as_str()) {
            scenarios.push(&r.scenario);
        }
        if !policies.contains(&r.policy.as_str()) {
            policies.push(&r.policy);
        }
    }
    let bar = 12.0;
    let group = bar * policies.len() as f64 + 24.0;
    let panel_w = group * scenarios.len() as f64 + 60.0;
    let panel_h = 220.0;
    let width = panel_w + 170.0;
    let height = 2.0 * panel_h + 120.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
"#
    );
    let max_attempts = reports
        .iter()
        .map(|r| r.attempts_per_request)
        .fold(1.0f64, f64::max)
        .ceil();
    let panels = [
        Panel {
            title: "success rate",
            max: 1.0,
            value: |r| r.success_rate,
            label: |v| format!("{:.0}%", v * 100.0),
        },
        Panel {
            title: "attempts per request",
            max: max_attempts,
            value: |r| r.attempts_per_request,
            label: |v| format!("{v:.1}"),
        },
    ];
    for (p, panel) in panels.iter().enumerate() {
        let Panel {
            title,
            max,
            value,
            label,
        } = panel;
        let top = 30.0 + p as f64 * (panel_h + 50.0);
        let left = 50.0;
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="{:.0}" font-size="13" font-weight="bold">{title}</text>"#,
            top - 8.0
        );
        for i in 0..=4 {
            let v = max * f64::from(i) / 4.0;
            let y = top + panel_h - panel_h * f64::from(i) / 4.0;
            let _ = writeln!(
                s,
                r##"<line x1="{left}" x2="{:.0}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + panel_w - 60.0,
                left - 4.0,
                y + 4.0,
                label(v)
            );
        }
        for (g, scenario) in scenarios.iter().enumerate() {
            let x0 = left + 12.0 + g as f64 * group;
            for (k, policy) in policies.iter().enumerate() {
                let Some(r) = reports
                    .iter()
                    .find(|r| r.scenario == *scenario && r.policy == *policy)
                else {
                    continue;
                };
                let v = value(r).clamp(0.0, *max);
                let h = if *max > 0.0 { panel_h * v / max } else { 0.0 };
                let colour = COLOURS.get(k % COLOURS.len()).copied().unwrap_or("#000");
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{colour}"><title>{scenario} / {policy}: {}</title></rect>"#,
                    x0 + k as f64 * bar,
                    top + panel_h - h,
                    bar - 1.0,
                    label(value(r))
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.0}" text-anchor="middle">{scenario}</text>"#,
                x0 + bar * policies.len() as f64 / 2.0,
                top + panel_h + 14.0
            );
        }
    }
    for (k, policy) in policies.iter().enumerate() {
        let colour = COLOURS.get(k % COLOURS.len()).copied().unwrap_or("#000");
        let y = 40.0 + k as f64 * 18.0;
        let x = panel_w + 10.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x:.0}" y="{:.0}" width="12" height="12" fill="{colour}"/><text x="{:.0}" y="{y:.0}">{policy}</text>"#,
            y - 10.0,
            x + 18.0
        );
    }
    s.push_str("</svg>\n");
    s
}
