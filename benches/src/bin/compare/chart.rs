//! The chart of the report: a panel per workload, a bar per implementation, the hardware floor.

use std::path::Path;

use anyhow::{Result, anyhow};

use super::records::fmt_us;

/// One workload in the chart: its title, a bar per implementation (label, µs per call), the
/// hardware floor (µs).
pub(crate) struct Panel {
    pub(crate) title: &'static str,
    pub(crate) bars: Vec<(String, f64)>,
    pub(crate) floor: f64,
}

/// One panel per workload: a bar per implementation (µs per call) and the hardware floor.
pub(crate) fn chart(path: &Path, panels: &[Panel], cpu: &str) -> Result<()> {
    use plotters::prelude::*;
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow!("the compiled-in DejaVu Sans font did not load"))?;
    let err = |e: String| anyhow!("plotters: {e}");
    let (w, bar_h, gap, head) = (1280i32, 30i32, 10i32, 56i32);
    let panel_h = |n: usize| head + n as i32 * (bar_h + gap) + 24;
    let total: i32 = 50 + panels.iter().map(|p| panel_h(p.bars.len())).sum::<i32>();
    let root = BitMapBackend::new(path, (w as u32, total as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let font = |size: i32| ("sans-serif", size).into_font();
    let draw_text = |s: &str, at: (i32, i32), size: i32, color: &RGBColor| {
        root.draw(&Text::new(s.to_string(), at, font(size).color(color)))
            .map_err(|e| err(e.to_string()))
    };
    draw_text(
        &format!("Tiller side by side: µs per call, one thread ({cpu})"),
        (16, 14),
        24,
        &BLACK,
    )?;
    let (left, right) = (330, w - 170);
    let mut top = 50;
    for Panel { title, bars, floor } in panels {
        draw_text(title, (16, top + 10), 20, &BLACK)?;
        let max = bars.iter().map(|b| b.1).fold(*floor, f64::max) * 1.02;
        let x_of = |us: f64| left + ((us / max) * f64::from(right - left)) as i32;
        let y0 = top + head - 12;
        for (i, (label, us)) in bars.iter().enumerate() {
            let y = y0 + i as i32 * (bar_h + gap);
            let color = if label.starts_with("Tiller") {
                RGBColor(31, 119, 180)
            } else if label.starts_with("ONNX") {
                RGBColor(255, 127, 14)
            } else {
                RGBColor(44, 160, 44)
            };
            draw_text(label, (16, y + 6), 17, &BLACK)?;
            root.draw(&Rectangle::new(
                [(left, y), (x_of(*us).max(left + 1), y + bar_h)],
                color.filled(),
            ))
            .map_err(|e| err(e.to_string()))?;
            // Past the floor's line when the bar ends next to it.
            let end = x_of(*us);
            let xf = x_of(*floor);
            let lx = if (xf - end).abs() < 12 {
                xf.max(end)
            } else {
                end
            };
            draw_text(&fmt_us(*us), (lx + 8, y + 6), 17, &BLACK)?;
        }
        // The floor: a dashed line across the bars.
        let x = x_of(*floor);
        let y_end = y0 + bars.len() as i32 * (bar_h + gap);
        let mut y = y0 - 6;
        while y < y_end {
            root.draw(&PathElement::new(
                vec![(x, y), (x, (y + 6).min(y_end))],
                RGBColor(200, 0, 0).stroke_width(2),
            ))
            .map_err(|e| err(e.to_string()))?;
            y += 10;
        }
        draw_text(
            &format!("hardware floor {}", fmt_us(*floor)),
            (x + 6, y0 - 22),
            15,
            &RGBColor(200, 0, 0),
        )?;
        top += panel_h(bars.len());
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
