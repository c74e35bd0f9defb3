//! Logging setup: text or JSON lines on stderr, level from `RUST_LOG` (default `info`). A task's
//! lines carry its span's fields (`job`, `task`, `kind`, `resource_type`, `attempt`): in text
//! before the message, in JSON as the object `span`.
//!
//! Every line is one event, whatever its values hold: JSON escapes control characters itself,
//! and text lines have theirs escaped (`\n`, `\u{1b}`, …) on the way out, so a newline in a
//! client's parameter cannot forge a line, nor an escape sequence rewrite a terminal. Text is
//! written without colors for the same reason.

use std::io::Write;

use tracing_subscriber::{EnvFilter, fmt::MakeWriter};

use crate::{config::LogFormat, db::jobs::Summary};

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(false)
            .with_writer(EscapedLines(std::io::stderr))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// The one line of a job's end (`completed`, `failed`, `cancelled` or `expired`): what it
/// wrote and how long it ran.
pub fn job_ended(summary: &Summary, outcome: &str) {
    tracing::info!(
        job = %summary.id,
        outcome,
        files = summary.files,
        resources = summary.resources,
        bytes = summary.bytes,
        seconds = (summary.seconds * 1000.0).round() / 1000.0,
        "export ended"
    );
}

/// A writer of text log lines that escapes the control characters inside each line.
struct EscapedLines<M>(M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for EscapedLines<M> {
    type Writer = EscapedLine<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        EscapedLine(self.0.make_writer())
    }
}

/// Gets one formatted event per `write` (the formatter writes each line at once).
struct EscapedLine<W>(W);

impl<W: Write> Write for EscapedLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(&escape_line(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// `line` with every control character (and Unicode's line separators) but its final newline
/// written as an escape.
fn escape_line(line: &[u8]) -> Vec<u8> {
    let (body, end) = match line.strip_suffix(b"\n") {
        Some(body) => (body, &b"\n"[..]),
        None => (line, &b""[..]),
    };
    let text = String::from_utf8_lossy(body);
    let mut out = String::with_capacity(text.len() + 1);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push('\t'),
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                out.push_str(&c.escape_unicode().to_string())
            }
            c => out.push(c),
        }
    }
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(end);
    bytes
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_line_stays_one_line() {
        let escaped = super::escape_line(b"kick-off _type=Patient\n2026 INFO forged\x1b[2J\x00\n");
        assert_eq!(
            String::from_utf8(escaped).unwrap(),
            "kick-off _type=Patient\\n2026 INFO forged\\u{1b}[2J\\u{0}\n"
        );
    }
}
