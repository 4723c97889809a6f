//! A hand-written SVG plot of broadcast time against tree fan-out: measured points joined by a
//! line, and the ideal `k·S/B` line dashed. No plotting dependency.

use std::fmt::Write;

/// One measured arity.
#[derive(Debug, Clone)]
pub(crate) struct Point {
    /// Label on the x axis (`chain`, `2`, `star`...).
    pub(crate) label: String,
    /// Fan-out: 1 for a chain, k for k-ary, N for a star.
    pub(crate) fan_out: f64,
    /// Measured seconds.
    pub(crate) seconds: f64,
    /// Ideal seconds (fan-out × S/B).
    pub(crate) ideal: f64,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" tick step (1, 2 or 5 × 10^n) giving about `ticks` ticks up to `max`.
pub(crate) fn nice_step(max: f64, ticks: u32) -> f64 {
    if !(max.is_finite() && max > 0.0) || ticks == 0 {
        return 1.0;
    }
    let raw = max / f64::from(ticks);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// Renders the plot as a standalone SVG document.
pub(crate) fn svg(title: &str, points: &[Point]) -> String {
    let (w, h) = (640.0, 420.0);
    let (l, r, t, b) = (70.0, 20.0, 40.0, 60.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let xmax = points
        .iter()
        .map(|p| p.fan_out)
        .fold(1.0f64, f64::max)
        .max(2.0);
    let ymax_data = points
        .iter()
        .flat_map(|p| [p.seconds, p.ideal])
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let ystep = nice_step(ymax_data * 1.1, 6);
    let ymax = (ymax_data * 1.1 / ystep).ceil().max(1.0) * ystep;
    let x = |v: f64| l + (v - 0.5) / (xmax - 0.5 + 0.5) * pw;
    let y = |v: f64| t + ph - v / ymax * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    // Axes and grid.
    let _ = writeln!(
        s,
        r#"<line x1="{l}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        t + ph,
        l + pw,
        t + ph
    );
    let _ = writeln!(
        s,
        r#"<line x1="{l}" y1="{t}" x2="{l}" y2="{}" stroke="black"/>"#,
        t + ph
    );
    let mut v = 0.0;
    let mut guard = 0;
    while v <= ymax + 1e-9 && guard < 100 {
        guard += 1;
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{yy:.1}" x2="{}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v}</text>"##,
            l + pw,
            l - 6.0,
            yy + 4.0
        );
        v += ystep;
    }
    for p in points {
        let xx = x(p.fan_out);
        let _ = writeln!(
            s,
            r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            t + ph + 18.0,
            esc(&p.label)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">tree fan-out (arity)</text>"#,
        l + pw / 2.0,
        h - 18.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">seconds</text>"#,
        t + ph / 2.0,
        t + ph / 2.0
    );
    let mut sorted: Vec<&Point> = points.iter().collect();
    sorted.sort_by(|a, b| a.fan_out.total_cmp(&b.fan_out));
    let line = |f: &dyn Fn(&Point) -> f64| -> String {
        sorted
            .iter()
            .filter(|p| f(p).is_finite())
            .map(|p| format!("{:.1},{:.1}", x(p.fan_out), y(f(p))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = writeln!(
        s,
        r##"<polyline points="{}" fill="none" stroke="#888" stroke-dasharray="6 4"/>"##,
        line(&|p| p.ideal)
    );
    let _ = writeln!(
        s,
        r##"<polyline points="{}" fill="none" stroke="#c33" stroke-width="2"/>"##,
        line(&|p| p.seconds)
    );
    for p in &sorted {
        if p.seconds.is_finite() {
            let _ = writeln!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#c33"><title>{}: {:.1} s</title></circle>"##,
                x(p.fan_out),
                y(p.seconds),
                esc(&p.label),
                p.seconds
            );
        }
    }
    // Legend.
    let lx = l + 12.0;
    let _ = writeln!(
        s,
        r##"<line x1="{lx}" y1="{}" x2="{}" y2="{}" stroke="#c33" stroke-width="2"/><text x="{}" y="{}">measured</text>"##,
        t + 10.0,
        lx + 24.0,
        t + 10.0,
        lx + 30.0,
        t + 14.0
    );
    let _ = writeln!(
        s,
        r##"<line x1="{lx}" y1="{}" x2="{}" y2="{}" stroke="#888" stroke-dasharray="6 4"/><text x="{}" y="{}">ideal k·S/B</text>"##,
        t + 28.0,
        lx + 24.0,
        t + 28.0,
        lx + 30.0,
        t + 32.0
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_nice() {
        assert_eq!(nice_step(100.0, 5), 20.0);
        assert_eq!(nice_step(90.0, 6), 20.0);
        assert_eq!(nice_step(7.0, 7), 1.0);
        assert_eq!(nice_step(0.0, 5), 1.0);
        assert_eq!(nice_step(f64::NAN, 5), 1.0);
    }

    #[test]
    fn svg_has_every_point_and_escapes_labels() {
        let pts = vec![
            Point {
                label: "chain".into(),
                fan_out: 1.0,
                seconds: 23.0,
                ideal: 21.5,
            },
            Point {
                label: "<2>".into(),
                fan_out: 2.0,
                seconds: 44.0,
                ideal: 43.0,
            },
        ];
        let s = svg("N=16 & 100mbit", &pts);
        assert!(s.starts_with("<svg"));
        assert!(s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<circle").count(), 2);
        assert!(s.contains("&lt;2&gt;"));
        assert!(s.contains("N=16 &amp; 100mbit"));
        assert!(!s.contains("NaN"));
    }
}
