//! The needle heat map: accuracy per (depth, length) cell, one panel per method, as a PNG drawn
//! with plotters' bitmap backend. Labels use a built-in 3×5 pixel font, so no font library (and
//! no system font) is needed.

use std::path::Path;

use plotters::prelude::*;

use super::error::{EvalError, Result};
use super::report::{depths_of, lengths_of, methods_of, Accuracy};
use super::run::RetrievalResult;

const CELL_W: i32 = 64;
const CELL_H: i32 = 30;
const LEFT: i32 = 70;
const TOP: i32 = 70;
const GAP: i32 = 40;
const BOTTOM: i32 = 90;
/// Pixels per font pixel of normal text.
const S: i32 = 2;

/// The colour of an accuracy in [0, 1]: red (0) through yellow (0.5) to green (1).
pub fn colour(acc: f64) -> RGBColor {
    let a = acc.clamp(0.0, 1.0);
    let lerp = |x: f64, y: f64, t: f64| (x + (y - x) * t).round() as u8;
    let (red, yellow, green) = ((215.0, 48.0, 39.0), (254.0, 224.0, 139.0), (26.0, 152.0, 80.0));
    let (from, to, t) = if a < 0.5 { (red, yellow, a * 2.0) } else { (yellow, green, a * 2.0 - 1.0) };
    RGBColor(lerp(from.0, to.0, t), lerp(from.1, to.1, t), lerp(from.2, to.2, t))
}

/// Draws the heat map of `results` (rows: depths, top = 0; columns: lengths; one panel per
/// method) to the PNG `path`, with `title` on top. Returns the image size.
///
/// # Errors
/// No results; [`EvalError::Plot`] when drawing or encoding fails; I/O errors creating the folder.
pub fn draw(path: &Path, results: &[RetrievalResult], title: &str) -> Result<(u32, u32)> {
    if results.is_empty() {
        return Err(EvalError::Plot("no results to draw".into()));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| EvalError::Io { path: dir.into(), source })?;
    }
    let depths = depths_of(results);
    let lengths = lengths_of(results.iter().map(|r| &r.length));
    let methods = methods_of(results.iter().map(|r| r.method));
    let panel_w = CELL_W * lengths.len() as i32;
    let width = LEFT + methods.len() as i32 * (panel_w + GAP) + 20;
    let height = TOP + CELL_H * depths.len() as i32 + BOTTOM;
    let size = (width.max(360) as u32, height as u32);
    let plot = |e: DrawingAreaErrorKind<_>| EvalError::Plot(format!("{e:?}"));
    let area = BitMapBackend::new(path, size).into_drawing_area();
    area.fill(&WHITE).map_err(plot)?;
    let mut pen = Pen { area: &area };
    pen.text(10, 10, 3, title, &BLACK).map_err(plot)?;
    pen.text(10, TOP - 16, S, "DEPTH", &BLACK).map_err(plot)?;
    for (i, d) in depths.iter().enumerate() {
        let y = TOP + i as i32 * CELL_H + (CELL_H - 5 * S) / 2;
        pen.text(10, y, S, &format!("{d}"), &BLACK).map_err(plot)?;
    }
    for (p, &m) in methods.iter().enumerate() {
        let x0 = LEFT + p as i32 * (panel_w + GAP);
        pen.text(x0, TOP - 34, S + 1, m.name(), &BLACK).map_err(plot)?;
        for (c, &l) in lengths.iter().enumerate() {
            let x = x0 + c as i32 * CELL_W;
            for (r, &d) in depths.iter().enumerate() {
                let y = TOP + r as i32 * CELL_H;
                let a = Accuracy::of(results, |x| x.method == m && x.length == l && x.depth == d);
                let fill = if a.total == 0 { RGBColor(200, 200, 200) } else { colour(a.ratio()) };
                area.draw(&Rectangle::new([(x, y), (x + CELL_W - 2, y + CELL_H - 2)], fill.filled()))
                    .map_err(plot)?;
                if a.total > 0 {
                    let label = format!("{:.0}%", a.ratio() * 100.0);
                    let tx = x + (CELL_W - 2 - text_width(&label, S)) / 2;
                    pen.text(tx, y + (CELL_H - 2 - 5 * S) / 2, S, &label, &BLACK).map_err(plot)?;
                }
            }
            let label = if l % 1024 == 0 { format!("{}K", l / 1024) } else { l.to_string() };
            let ly = TOP + depths.len() as i32 * CELL_H + 6;
            pen.text(x + (CELL_W - text_width(&label, S)) / 2, ly, S, &label, &BLACK).map_err(plot)?;
        }
    }
    let ly = TOP + depths.len() as i32 * CELL_H + 26;
    pen.text(LEFT, ly, S, "CONTEXT LENGTH (TOKENS)", &BLACK).map_err(plot)?;
    // Colour legend.
    let ly = ly + 24;
    pen.text(LEFT, ly, S, "0%", &BLACK).map_err(plot)?;
    for i in 0..100 {
        let x = LEFT + 30 + i * 2;
        area.draw(&Rectangle::new([(x, ly), (x + 2, ly + 10)], colour(i as f64 / 99.0).filled()))
            .map_err(plot)?;
    }
    pen.text(LEFT + 236, ly, S, "100%", &BLACK).map_err(plot)?;
    area.present().map_err(plot)?;
    Ok(size)
}

/// Width in pixels of `text` at `scale`.
fn text_width(text: &str, scale: i32) -> i32 {
    text.chars().count() as i32 * 4 * scale - scale
}

struct Pen<'a, 'b> {
    area: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
}

type DrawResult<'b> =
    std::result::Result<(), DrawingAreaErrorKind<<BitMapBackend<'b> as DrawingBackend>::ErrorType>>;

impl<'b> Pen<'_, 'b> {
    /// Draws `text` (upper-cased; unknown characters as blanks) with its top-left at (x, y).
    fn text(&mut self, x: i32, y: i32, scale: i32, text: &str, colour: &RGBColor) -> DrawResult<'b> {
        for (i, ch) in text.chars().enumerate() {
            let rows = glyph(ch.to_ascii_uppercase());
            let gx = x + i as i32 * 4 * scale;
            for (r, row) in rows.iter().enumerate() {
                for c in 0..3 {
                    if row & (0b100 >> c) != 0 {
                        let px = gx + c * scale;
                        let py = y + r as i32 * scale;
                        self.area.draw(&Rectangle::new(
                            [(px, py), (px + scale - 1, py + scale - 1)],
                            colour.filled(),
                        ))?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The 3×5 glyph of `c`: five rows, bit 2 = left column.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        '.' => [0, 0, 0, 0, 2],
        ',' => [0, 0, 0, 2, 4],
        '%' => [5, 1, 2, 4, 5],
        '-' => [0, 0, 7, 0, 0],
        ':' => [0, 2, 0, 2, 0],
        '=' => [0, 7, 0, 7, 0],
        '/' => [1, 1, 2, 4, 4],
        '(' => [2, 4, 4, 4, 2],
        ')' => [2, 1, 1, 1, 2],
        '×' => [0, 5, 2, 5, 0],
        _ => [0; 5],
    }
}
