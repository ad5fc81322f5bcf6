//! The results: one [`Row`] per measurement, printed as a table and rendered as the numbers part
//! of `docs/BENCHMARKS.md` (between two marker comments, so the prose around them is kept).

use std::fmt::Write as _;
use std::path::Path;

/// What a row is held to.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// value / baseline at least this.
    RatioAtLeast(f64),
    /// value (in the row's unit) at most this.
    AtMost(f64),
    /// value at least this.
    AtLeast(f64),
    /// value / baseline at most this.
    RatioAtMost(f64),
    /// An experiment or a detail: reported, not judged.
    None,
}

#[derive(Debug, Clone)]
pub struct Row {
    pub section: &'static str,
    pub what: String,
    pub value: Option<f64>,
    pub unit: &'static str,
    /// Baseline label and value, in the same unit.
    pub baseline: Option<(String, f64)>,
    pub target: Target,
    /// Why there is no value, or what limits it.
    pub note: String,
}

impl Row {
    pub fn new(
        section: &'static str,
        what: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Row {
        Row {
            section,
            what: what.into(),
            value: Some(value),
            unit,
            baseline: None,
            target: Target::None,
            note: String::new(),
        }
    }

    pub fn missing(section: &'static str, what: impl Into<String>, note: impl Into<String>) -> Row {
        Row {
            section,
            what: what.into(),
            value: None,
            unit: "",
            baseline: None,
            target: Target::None,
            note: note.into(),
        }
    }

    pub fn baseline(mut self, label: impl Into<String>, value: f64) -> Row {
        self.baseline = Some((label.into(), value));
        self
    }

    pub fn target(mut self, t: Target) -> Row {
        self.target = t;
        self
    }

    pub fn note(mut self, n: impl Into<String>) -> Row {
        self.note = n.into();
        self
    }

    pub fn ratio(&self) -> Option<f64> {
        match (self.value, &self.baseline) {
            (Some(v), Some((_, b))) if *b > 0.0 => Some(v / b),
            _ => None,
        }
    }

    /// Whether the target is met; `None` for rows without a target or without a value.
    pub fn met(&self) -> Option<bool> {
        let v = self.value?;
        match self.target {
            Target::RatioAtLeast(t) => self.ratio().map(|r| r >= t),
            Target::RatioAtMost(t) => self.ratio().map(|r| r <= t),
            Target::AtMost(t) => Some(v <= t),
            Target::AtLeast(t) => Some(v >= t),
            Target::None => None,
        }
    }

    fn target_text(&self) -> String {
        match self.target {
            Target::RatioAtLeast(t) => format!(">= {}x", ratio_text(t)),
            Target::RatioAtMost(t) => format!("<= {}x", ratio_text(t)),
            Target::AtMost(t) => format!("<= {} {}", num(t), self.unit),
            Target::AtLeast(t) => format!(">= {} {}", num(t), self.unit),
            Target::None => "-".into(),
        }
    }

    fn cells(&self) -> [String; 7] {
        let value = match self.value {
            Some(v) => format!("{} {}", num(v), self.unit),
            None => "-".into(),
        };
        let baseline = match &self.baseline {
            Some((label, b)) => format!("{} ({label})", num(*b)),
            None => "-".into(),
        };
        let ratio = self
            .ratio()
            .map(|r| format!("{r:.2}x"))
            .unwrap_or_else(|| "-".into());
        let met = match self.met() {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        [
            self.what.clone(),
            value,
            baseline,
            ratio,
            self.target_text(),
            met.into(),
            self.note.clone(),
        ]
    }
}

/// A number with a sensible number of digits.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        // Thousands separated by commas.
        let s = format!("{:.0}", v);
        let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 || a == 0.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

const HEAD: [&str; 7] = [
    "what", "value", "baseline", "ratio", "target", "met", "note",
];

/// The table for a terminal, section by section.
pub fn print_table(rows: &[Row]) {
    let cells: Vec<[String; 7]> = rows.iter().map(Row::cells).collect();
    let mut width = HEAD.map(str::len);
    for c in &cells {
        for (i, s) in c.iter().enumerate().take(6) {
            width[i] = width[i].max(s.chars().count());
        }
    }
    let line = |c: &[String]| {
        let mut s = String::new();
        for (i, cell) in c.iter().enumerate() {
            if i < 6 {
                let _ = write!(s, "{:<w$}  ", cell, w = width[i]);
            } else {
                s.push_str(cell);
            }
        }
        s.trim_end().to_string()
    };
    println!();
    println!("{}", line(&HEAD.map(String::from)));
    let mut section = "";
    for (row, c) in rows.iter().zip(&cells) {
        if row.section != section {
            section = row.section;
            println!("-- {section}");
        }
        println!("{}", line(c));
    }
}

/// The markdown for the numbers part of `docs/BENCHMARKS.md`.
pub fn markdown(rows: &[Row], machine: &str, run: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{run}\n");
    let _ = writeln!(s, "Machine:\n\n{machine}\n");
    let mut section = "";
    for (row, c) in rows.iter().zip(rows.iter().map(Row::cells)) {
        if row.section != section {
            section = row.section;
            let _ = writeln!(s, "\n### {section}\n");
            let _ = writeln!(s, "| {} |", HEAD.join(" | "));
            let _ = writeln!(s, "|{}", "---|".repeat(HEAD.len()));
        }
        let c: Vec<String> = c.iter().map(|x| x.replace('|', "\\|")).collect();
        let _ = writeln!(s, "| {} |", c.join(" | "));
    }
    s
}

pub const BEGIN: &str =
    "<!-- bench:begin (written by `make bench`; edit outside these markers) -->";
pub const END: &str = "<!-- bench:end -->";

/// Replaces the text between the markers in `path` (or appends the markers and the text).
pub fn write_doc(path: &Path, numbers: &str) -> std::io::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{numbers}\n{END}");
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &old[..b], block, &old[e + END.len()..]),
        _ if old.is_empty() => format!("# Benchmarks\n\n{block}\n"),
        _ => format!("{old}\n{block}\n"),
    };
    std::fs::write(path, new)
}

/// A target ratio as people write it: `0.8`, `1.1`, `1.13` (at most two decimals).
fn ratio_text(t: f64) -> String {
    let s = format!("{t:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}
