//! The demo's PNG renderer: a valid PNG of the stated size that decodes to what was drawn,
//! every panel with its lines, and each line where its data puts it (and nowhere else in its
//! column), gaps left open.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use unbusy_tests::png_chart::{
    plot_area, render, text_width, to_pixel, Chart, Image, Panel, Rect, Rgb, Series, WHITE,
};

const RED: Rgb = [220, 50, 47];
const GREEN: Rgb = [46, 125, 50];
const BLUE: Rgb = [30, 90, 200];

fn series(label: &str, colour: Rgb, points: &[(f64, f64)]) -> Series {
    Series {
        label: label.into(),
        colour,
        points: points.to_vec(),
    }
}

fn panel(title: &str, y_max: f64, series: Vec<Series>) -> Panel {
    Panel {
        title: title.into(),
        y_max,
        y_ticks: 4,
        series,
    }
}

fn chart() -> Chart {
    Chart {
        title: "Test chart".into(),
        x_label: "seconds".into(),
        x_max: 30.0,
        x_tick: 10.0,
        width: 1000,
        height: 640,
        columns: 2,
        panels: vec![
            panel(
                "flat",
                100.0,
                vec![series("direct", RED, &[(0.0, 50.0), (30.0, 50.0)])],
            ),
            panel(
                "rising",
                100.0,
                vec![series("via", GREEN, &[(0.0, 0.0), (30.0, 100.0)])],
            ),
            panel(
                "gap",
                4.0,
                vec![series(
                    "gapped",
                    BLUE,
                    &[
                        (0.0, 1.0),
                        (10.0, 1.0),
                        (12.0, f64::NAN),
                        (20.0, 3.0),
                        (30.0, 3.0),
                    ],
                )],
            ),
            panel(
                "two",
                3.0,
                vec![
                    series("direct", RED, &[(0.0, 0.0), (30.0, 0.0)]),
                    series("via", GREEN, &[(0.0, 2.0), (30.0, 2.0)]),
                ],
            ),
        ],
    }
}

/// The rows of `area` in column `x` where `img` has `colour`.
fn rows_with(img: &Image, area: Rect, x: i64, colour: Rgb) -> Vec<i64> {
    (area.y0..area.y1)
        .filter(|y| img.get(x as u32, *y) == Some(colour))
        .map(i64::from)
        .collect()
}

fn decode(bytes: &[u8]) -> (png::OutputInfo, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info, buf)
}

#[test]
fn renders_a_png_of_the_stated_size_that_decodes_to_what_was_drawn() {
    let c = chart();
    let img = render(&c);
    let bytes = img.png().unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let (info, pixels) = decode(&bytes);
    assert_eq!((info.width, info.height), (1000, 640));
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    assert_eq!(pixels, img.rgb, "the decoded pixels are the drawn ones");
    // Compressed: a mostly white picture is far smaller than its raw pixels.
    assert!(bytes.len() < img.rgb.len() / 10, "{} bytes", bytes.len());
}

#[test]
fn every_panel_has_its_lines_and_its_labels() {
    let c = chart();
    let img = render(&c);
    for (i, p) in c.panels.iter().enumerate() {
        let a = plot_area(&c, i);
        assert!(a.x1 > a.x0 + 100 && a.y1 > a.y0 + 100, "{a:?}");
        for s in &p.series {
            let n = (a.y0..a.y1)
                .flat_map(|y| (a.x0..a.x1).map(move |x| (x, y)))
                .filter(|(x, y)| img.get(*x, *y) == Some(s.colour))
                .count();
            assert!(n > 200, "panel {}: {} has {n} pixels", p.title, s.label);
        }
        // The title above the plot area, in ink.
        let title = Rect {
            x0: a.x0,
            y0: a.y0 - 24,
            x1: a.x0 + text_width(&p.title),
            y1: a.y0 - 10,
        };
        let inked = (title.y0..title.y1)
            .flat_map(|y| (title.x0..title.x1).map(move |x| (x, y)))
            .filter(|(x, y)| !matches!(img.get(*x, *y), Some(WHITE)))
            .count();
        assert!(inked > 20, "panel {}: title has {inked} pixels", p.title);
    }
    // Nothing drawn in a panel's colour outside the panels' plot areas but the legend.
    let legend_end = 60;
    for y in legend_end..c.height {
        for x in 0..c.width {
            if img.get(x, y) == Some(BLUE) {
                let a = plot_area(&c, 2);
                assert!(
                    (a.x0..a.x1).contains(&x) && (a.y0..a.y1).contains(&y),
                    "blue at ({x}, {y})"
                );
            }
        }
    }
}

#[test]
fn each_line_is_where_its_data_is() {
    let c = chart();
    let img = render(&c);
    // Flat at 50 of 100: in the column at x = 15 s, the red line is at half height, 3 px thick.
    let (x, y) = to_pixel(&c, 0, 15.0, 50.0);
    let a = plot_area(&c, 0);
    assert_eq!(
        y,
        i64::from(a.y1 - 1) - i64::from(a.y1 - a.y0 - 1) / 2,
        "half height"
    );
    assert_eq!(rows_with(&img, a, x, RED), [y - 1, y, y + 1]);
    // Rising from (0, 0) to (30, 100): at 15 s it is at 50, at 27 s at 90 (a tenth of the
    // height below the top, 90% of the width from the left).
    let a = plot_area(&c, 1);
    let (w, h) = (f64::from(a.x1 - a.x0 - 1), f64::from(a.y1 - a.y0 - 1));
    assert_eq!(
        to_pixel(&c, 1, 27.0, 90.0),
        (
            i64::from(a.x0) + (0.9 * w).round() as i64,
            i64::from(a.y0) + (0.1 * h).round() as i64
        )
    );
    for (t, v) in [(15.0, 50.0), (27.0, 90.0)] {
        let (x, y) = to_pixel(&c, 1, t, v);
        let rows = rows_with(&img, a, x, GREEN);
        assert!(
            !rows.is_empty() && rows.iter().all(|r| (r - y).abs() <= 2),
            "at {t} s: rows {rows:?}, want about {y}"
        );
    }
    // The gap between 10 s and 20 s: nothing at 15 s; the line at 1 before, at 3 after.
    let a = plot_area(&c, 2);
    let (x, _) = to_pixel(&c, 2, 15.0, 0.0);
    assert_eq!(rows_with(&img, a, x, BLUE), Vec::<i64>::new());
    for (t, v) in [(5.0, 1.0), (25.0, 3.0)] {
        let (x, y) = to_pixel(&c, 2, t, v);
        assert_eq!(rows_with(&img, a, x, BLUE), [y - 1, y, y + 1], "at {t} s");
    }
    // Two lines in one panel, each at its own height: red on the x axis (0), green at 2 of 3.
    let a = plot_area(&c, 3);
    let (x, y0) = to_pixel(&c, 3, 20.0, 0.0);
    let (_, y2) = to_pixel(&c, 3, 20.0, 2.0);
    assert_eq!(rows_with(&img, a, x, RED), [y0 - 1, y0]);
    assert_eq!(rows_with(&img, a, x, GREEN), [y2 - 1, y2, y2 + 1]);
    // Values past the axis are clamped to its top.
    assert_eq!(to_pixel(&c, 3, 20.0, 9.0).1, i64::from(a.y0));
}

#[test]
fn the_font_draws_glyphs_pixel_for_pixel() {
    let mut img = Image::new(40, 20, WHITE);
    let w = img.text(1, 1, "1", [0, 0, 0]);
    assert_eq!(w, 12);
    // "1" is 0x04 0x0C 0x04 ... 0x0E: its top row is one font pixel (2x2) in the middle column.
    let row = |y: u32| -> String {
        (1..11)
            .map(|x| {
                if img.get(x, y) == Some([0, 0, 0]) {
                    '#'
                } else {
                    '.'
                }
            })
            .collect()
    };
    assert_eq!(row(1), "....##....");
    assert_eq!(row(3), "..####....");
    assert_eq!(row(13), "..######..");
    assert_eq!(row(15), "..........");
    // Lower case is drawn as capitals.
    let (mut a, mut b) = (Image::new(20, 20, WHITE), Image::new(20, 20, WHITE));
    a.text(0, 0, "q", [0, 0, 0]);
    b.text(0, 0, "Q", [0, 0, 0]);
    assert_eq!(a, b);
}
