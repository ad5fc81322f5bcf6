//! Errors of the TOML parser made readable for a person: the dotted key the error points into
//! (`mqtt.parse[0].format`), toml's message, and the line and column. Pure: no I/O.

/// One line: the dotted key (when the error points into a key or value), toml's message, the position.
pub(super) fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim_end();
    let Some(span) = err.span() else {
        return message.to_owned();
    };
    let (line, column) = line_column(text, span.start);
    match key_at(text, &span) {
        Some(key) => format!("{key}: {message} (line {line}, column {column})"),
        None => format!("{message} (line {line}, column {column})"),
    }
}

/// 1-based line and column (in characters) of the byte offset `pos`.
fn line_column(text: &str, pos: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..pos.min(text.len())];
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    // Count characters, not bytes: skip UTF-8 continuation bytes.
    let column = before[line_start..]
        .iter()
        .filter(|b| (**b & 0xC0) != 0x80)
        .count()
        + 1;
    (line, column)
}

#[derive(Clone)]
enum Segment {
    Key(String),
    Index(usize),
}

/// The dotted path (`mqtt.parse[0].format`) of the innermost key or value whose span covers `span`.
/// Parses `text` again, which only happens on the error path.
fn key_at(text: &str, span: &std::ops::Range<usize>) -> Option<String> {
    // Recoverable, so that a syntax error (a duplicate key) still finds the keys around it.
    let (doc, _) = toml::de::DeTable::parse_recoverable(text);
    let mut best: Option<(usize, Vec<Segment>)> = None;
    let mut path = Vec::new();
    visit_table(doc.get_ref(), span, &mut path, &mut best);
    let (_, segments) = best?;
    let mut key = String::new();
    for segment in segments {
        match segment {
            Segment::Key(k) if key.is_empty() => key.push_str(&k),
            Segment::Key(k) => {
                key.push('.');
                key.push_str(&k);
            }
            Segment::Index(i) => key.push_str(&format!("[{i}]")),
        }
    }
    Some(key)
}

type Candidate = Option<(usize, Vec<Segment>)>;

fn visit_table(
    table: &toml::de::DeTable<'_>,
    span: &std::ops::Range<usize>,
    path: &mut Vec<Segment>,
    best: &mut Candidate,
) {
    for (key, value) in table {
        path.push(Segment::Key(key.get_ref().to_string()));
        consider(&key.span(), span, path, best);
        visit_value(value, span, path, best);
        path.pop();
    }
}

fn visit_value(
    value: &toml::Spanned<toml::de::DeValue<'_>>,
    span: &std::ops::Range<usize>,
    path: &mut Vec<Segment>,
    best: &mut Candidate,
) {
    consider(&value.span(), span, path, best);
    match value.get_ref() {
        toml::de::DeValue::Table(table) => visit_table(table, span, path, best),
        toml::de::DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Segment::Index(i));
                visit_value(item, span, path, best);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Keeps the candidate with the smallest span covering the error; on a tie, the deeper path.
fn consider(
    candidate: &std::ops::Range<usize>,
    span: &std::ops::Range<usize>,
    path: &[Segment],
    best: &mut Candidate,
) {
    if candidate.start > span.start || span.end > candidate.end {
        return;
    }
    let len = candidate.end - candidate.start;
    let better = match best {
        None => true,
        Some((best_len, best_path)) => {
            len < *best_len || (len == *best_len && path.len() > best_path.len())
        }
    };
    if better {
        *best = Some((len, path.to_vec()));
    }
}
