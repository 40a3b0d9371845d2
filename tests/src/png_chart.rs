//! Time-series panels rendered to a PNG in plain Rust, for `make demo`'s picture of its own
//! run (`docs/demo.png`): the panels a Grafana dashboard would show, where Grafana cannot be
//! installed. Everything is drawn here (rectangles, lines, a 5x7 bitmap font of capitals,
//! digits and a little punctuation) and encoded by the `png` crate, so rendering needs no
//! system fonts, no browser and nothing beyond cargo.

/// A colour, red green blue.
pub type Rgb = [u8; 3];

/// The background.
pub const WHITE: Rgb = [255, 255, 255];
const INK: Rgb = [40, 40, 40];
const GRID: Rgb = [225, 225, 225];
const AXIS: Rgb = [150, 150, 150];

/// One line: its legend label, colour and points (x, y); a NaN y leaves a gap.
#[derive(Debug, Clone)]
pub struct Series {
    /// The legend's label.
    pub label: String,
    /// Its colour.
    pub colour: Rgb,
    /// (x, y) in data units, x increasing.
    pub points: Vec<(f64, f64)>,
}

/// One panel: a title, the y axis from 0 to `y_max` with `y_ticks` intervals, its lines.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Shown above the plot.
    pub title: String,
    /// The top of the y axis.
    pub y_max: f64,
    /// How many intervals the y axis is labelled in.
    pub y_ticks: u32,
    /// The lines.
    pub series: Vec<Series>,
}

/// A grid of panels sharing the x axis (0 to `x_max`, labelled every `x_tick`).
#[derive(Debug, Clone)]
pub struct Chart {
    /// Across the top.
    pub title: String,
    /// Under every panel's x axis.
    pub x_label: String,
    /// The right end of the x axis.
    pub x_max: f64,
    /// The x axis' label spacing.
    pub x_tick: f64,
    /// The image's size in pixels.
    pub width: u32,
    /// The image's size in pixels.
    pub height: u32,
    /// Panels per row.
    pub columns: u32,
    /// Left to right, then top to bottom.
    pub panels: Vec<Panel>,
}

/// A rectangle of pixels: `x0..x1` by `y0..y1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    /// Left, inclusive.
    pub x0: u32,
    /// Top, inclusive.
    pub y0: u32,
    /// Right, exclusive.
    pub x1: u32,
    /// Bottom, exclusive.
    pub y1: u32,
}

/// An RGB image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Pixels across.
    pub width: u32,
    /// Pixels down.
    pub height: u32,
    /// Row by row, three bytes a pixel.
    pub rgb: Vec<u8>,
}

/// The scale of the bitmap font: each font pixel is this many pixels square.
const SCALE: u32 = 2;
/// A character's advance: five columns and one of space.
const ADVANCE: u32 = 6 * SCALE;
const HEADER: u32 = 70;
const MARGIN_LEFT: u32 = 70;
const MARGIN_RIGHT: u32 = 20;
const MARGIN_TOP: u32 = 34;
const MARGIN_BOTTOM: u32 = 52;

impl Image {
    /// A `width` x `height` image of one colour.
    pub fn new(width: u32, height: u32, colour: Rgb) -> Self {
        let n = width as usize * height as usize;
        Self {
            width,
            height,
            rgb: colour.iter().copied().cycle().take(n * 3).collect(),
        }
    }

    /// The pixel at (x, y), if inside.
    pub fn get(&self, x: u32, y: u32) -> Option<Rgb> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        Some([
            *self.rgb.get(i)?,
            *self.rgb.get(i + 1)?,
            *self.rgb.get(i + 2)?,
        ])
    }

    /// Paints a pixel; outside the image, nothing.
    pub fn set(&mut self, x: i64, y: i64, colour: Rgb) {
        if x < 0 || y < 0 || x >= i64::from(self.width) || y >= i64::from(self.height) {
            return;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        if let Some(px) = self.rgb.get_mut(i..i + 3) {
            px.copy_from_slice(&colour);
        }
    }

    /// Fills a rectangle (clipped to the image).
    pub fn fill(&mut self, r: Rect, colour: Rgb) {
        for y in r.y0..r.y1.min(self.height) {
            for x in r.x0..r.x1.min(self.width) {
                self.set(i64::from(x), i64::from(y), colour);
            }
        }
    }

    /// A line `width` pixels thick from (x0, y0) to (x1, y1) (Bresenham's, each step a
    /// square), drawn only inside `clip`.
    pub fn line(&mut self, from: (i64, i64), to: (i64, i64), width: i64, colour: Rgb, clip: Rect) {
        let inside = |x: i64, y: i64| {
            x >= i64::from(clip.x0)
                && x < i64::from(clip.x1)
                && y >= i64::from(clip.y0)
                && y < i64::from(clip.y1)
        };
        let (mut x, mut y) = from;
        let (dx, dy) = ((to.0 - x).abs(), -(to.1 - y).abs());
        let (sx, sy) = (if x < to.0 { 1 } else { -1 }, if y < to.1 { 1 } else { -1 });
        let mut err = dx + dy;
        let lo = -(width - 1) / 2;
        loop {
            for ox in lo..lo + width {
                for oy in lo..lo + width {
                    if inside(x + ox, y + oy) {
                        self.set(x + ox, y + oy, colour);
                    }
                }
            }
            if (x, y) == to {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Writes `text` with its top left corner at (x, y) in the bitmap font (lower case is
    /// drawn as capitals; a character the font lacks as `?`). Returns its width in pixels.
    pub fn text(&mut self, x: u32, y: u32, text: &str, colour: Rgb) -> u32 {
        let mut cx = x;
        for c in text.chars() {
            for (row, bits) in glyph(c).iter().enumerate() {
                for col in 0..5u32 {
                    if bits & (0x10 >> col) != 0 {
                        let px = cx + col * SCALE;
                        let py = y + row as u32 * SCALE;
                        self.fill(
                            Rect {
                                x0: px,
                                y0: py,
                                x1: px + SCALE,
                                y1: py + SCALE,
                            },
                            colour,
                        );
                    }
                }
            }
            cx += ADVANCE;
        }
        cx - x
    }

    /// The image as a PNG file (8-bit RGB).
    pub fn png(&self) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, self.width, self.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
        writer
            .write_image_data(&self.rgb)
            .map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())?;
        Ok(out)
    }
}

/// The width in pixels `text` takes.
pub fn text_width(text: &str) -> u32 {
    text.chars().count() as u32 * ADVANCE
}

/// Panel `i`'s whole cell.
fn cell(chart: &Chart, i: usize) -> Rect {
    let columns = chart.columns.max(1);
    let rows = (chart.panels.len() as u32).div_ceil(columns).max(1);
    let (w, h) = (
        chart.width / columns,
        chart.height.saturating_sub(HEADER) / rows,
    );
    let (col, row) = (i as u32 % columns, i as u32 / columns);
    Rect {
        x0: col * w,
        y0: HEADER + row * h,
        x1: (col + 1) * w,
        y1: HEADER + (row + 1) * h,
    }
}

/// Panel `i`'s plot area: where its data is drawn, inside the axes.
pub fn plot_area(chart: &Chart, i: usize) -> Rect {
    let c = cell(chart, i);
    Rect {
        x0: c.x0 + MARGIN_LEFT,
        y0: c.y0 + MARGIN_TOP,
        x1: c.x1.saturating_sub(MARGIN_RIGHT),
        y1: c.y1.saturating_sub(MARGIN_BOTTOM),
    }
}

/// The pixel where panel `i` draws the point (x, y), clamped to its plot area.
pub fn to_pixel(chart: &Chart, i: usize, x: f64, y: f64) -> (i64, i64) {
    let a = plot_area(chart, i);
    let y_max = chart.panels.get(i).map_or(1.0, |p| p.y_max);
    let fx = (x / chart.x_max).clamp(0.0, 1.0);
    let fy = (y / y_max).clamp(0.0, 1.0);
    let w = f64::from(a.x1 - a.x0 - 1);
    let h = f64::from(a.y1 - a.y0 - 1);
    (
        i64::from(a.x0) + (fx * w).round() as i64,
        i64::from(a.y1 - 1) - (fy * h).round() as i64,
    )
}

/// A tick's label: no decimals when whole.
fn number(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else if v < 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// Draws the chart.
pub fn render(chart: &Chart) -> Image {
    let mut img = Image::new(chart.width, chart.height, WHITE);
    img.text(16, 12, &chart.title, INK);
    // The legend: every label once, in the order first seen.
    let mut seen: Vec<(&str, Rgb)> = Vec::new();
    for s in chart.panels.iter().flat_map(|p| &p.series) {
        if !seen.iter().any(|(l, _)| *l == s.label) {
            seen.push((&s.label, s.colour));
        }
    }
    let mut x = 16;
    for (label, colour) in seen {
        img.fill(
            Rect {
                x0: x,
                y0: 44,
                x1: x + 28,
                y1: 50,
            },
            colour,
        );
        x += 36 + img.text(x + 36, 40, label, INK) + 24;
    }
    for (i, panel) in chart.panels.iter().enumerate() {
        let a = plot_area(chart, i);
        let c = cell(chart, i);
        img.text(a.x0, c.y0 + 10, &panel.title, INK);
        // Grid and y labels.
        let ticks = panel.y_ticks.max(1);
        for t in 0..=ticks {
            let v = panel.y_max * f64::from(t) / f64::from(ticks);
            let (_, y) = to_pixel(chart, i, 0.0, v);
            img.line((i64::from(a.x0), y), (i64::from(a.x1) - 1, y), 1, GRID, a);
            let label = number(v);
            let lx = a.x0.saturating_sub(8 + text_width(&label));
            img.text(lx, (y as u32).saturating_sub(7), &label, INK);
        }
        // x labels.
        let mut xv = 0.0;
        while xv <= chart.x_max + 1e-9 && chart.x_tick > 0.0 {
            let (x, _) = to_pixel(chart, i, xv, 0.0);
            img.line((x, i64::from(a.y0)), (x, i64::from(a.y1) - 1), 1, GRID, a);
            let label = number(xv);
            let lx = (x as u32).saturating_sub(text_width(&label) / 2);
            img.text(lx, a.y1 + 6, &label, INK);
            xv += chart.x_tick;
        }
        let xl = &chart.x_label;
        let mid = (a.x0 + a.x1) / 2;
        img.text(mid.saturating_sub(text_width(xl) / 2), a.y1 + 28, xl, AXIS);
        // Axes.
        let (bottom, right) = (i64::from(a.y1) - 1, i64::from(a.x1) - 1);
        img.line((i64::from(a.x0), bottom), (right, bottom), 1, AXIS, a);
        img.line(
            (i64::from(a.x0), i64::from(a.y0)),
            (i64::from(a.x0), bottom),
            1,
            AXIS,
            a,
        );
        // The lines, over everything else.
        for s in &panel.series {
            let mut last: Option<(i64, i64)> = None;
            for &(x, y) in &s.points {
                if !y.is_finite() {
                    last = None;
                    continue;
                }
                let p = to_pixel(chart, i, x, y);
                img.line(last.unwrap_or(p), p, 3, s.colour, a);
                last = Some(p);
            }
        }
    }
    img
}

/// The font: seven rows of five bits (the high bit on the left).
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        ' ' => [0; 7],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        ';' => [0, 0x0C, 0x0C, 0, 0x0C, 0x04, 0x08],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '\'' => [0x0C, 0x04, 0x08, 0, 0, 0, 0],
        '<' => [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02],
        '>' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04],
    }
}
