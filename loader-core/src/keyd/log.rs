//! The key service's operational log: one line per request and per start, shutdown,
//! reload and fetch failure, as text or JSON (docs/KEY-SERVICE.md, "Logs"). What the
//! service decided about keys is in the audit log; this log never carries a token, a
//! DEK, a KEK, a manifest body or an Authorization header: callers give it only the
//! fields below, and every string is escaped so a client cannot forge a line.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde_json::Value;

use crate::error::Error;
use crate::watch::{Event, Reporter};

/// How the key service writes its log lines ([`crate::KeydConfig::log_format`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `TIME LEVEL EVENT key=value ...`, strings quoted (JSON escapes) when they hold
    /// anything but letters, digits and `-_.:/@[]`.
    #[default]
    Text,
    /// One JSON object per line: `time`, `level`, `event` and the event's fields.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(Error::InvalidArgument(format!("log format {s:?}: use text or json"))),
        }
    }
}

/// One log line's fields after `time`, `level` and `event`, in order (a `Null` value is
/// left out).
pub(super) type Fields = Vec<(&'static str, Value)>;

/// The log sink, shared by every connection.
pub(super) struct Log {
    format: LogFormat,
    sink: Mutex<Box<dyn Write + Send>>,
}

fn plain(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:/@[]".contains(c))
}

impl Log {
    pub(super) fn new(format: LogFormat, sink: Box<dyn Write + Send>) -> Self {
        Self { format, sink: Mutex::new(sink) }
    }

    /// Writes one line. A sink that fails (a closed stderr) does not stop the service.
    pub(super) fn line(&self, level: &'static str, event: &'static str, fields: Fields) {
        // humantime panics outside years 1970 to 9999: a wrong clock must not stop a request.
        let now = SystemTime::now().clamp(SystemTime::UNIX_EPOCH, crate::time::max_time());
        let time = humantime::format_rfc3339_millis(now).to_string();
        let mut text = match self.format {
            LogFormat::Json => {
                let mut m = serde_json::Map::new();
                m.insert("time".into(), Value::String(time));
                m.insert("level".into(), Value::String(level.into()));
                m.insert("event".into(), Value::String(event.into()));
                for (k, v) in fields {
                    if !v.is_null() {
                        m.insert(k.into(), v);
                    }
                }
                Value::Object(m).to_string()
            }
            LogFormat::Text => {
                let mut t = format!("{time} {level} {event}");
                for (k, v) in fields {
                    let v = match v {
                        Value::Null => continue,
                        Value::String(s) if plain(&s) => s,
                        // JSON escapes: no newline, quote or control character gets through.
                        other => other.to_string(),
                    };
                    t.push(' ');
                    t.push_str(k);
                    t.push('=');
                    t.push_str(&v);
                }
                t
            }
        };
        text.push('\n');
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        let _ = sink.write_all(text.as_bytes()).and_then(|()| sink.flush());
    }

    /// A reporter for watched documents: `reload` and `reload_failed` lines.
    pub(super) fn reporter(self: &Arc<Self>) -> Reporter {
        let log = self.clone();
        Arc::new(move |e: &Event<'_>| match e {
            Event::Reloaded { what, source, entries } => log.line(
                "info",
                "reload",
                vec![
                    ("what", (*what).into()),
                    ("source", source.display().to_string().into()),
                    ("entries", (*entries).into()),
                ],
            ),
            Event::Failed { what, source, error, kept } => log.line(
                "warn",
                "reload_failed",
                vec![
                    ("what", (*what).into()),
                    ("source", source.display().to_string().into()),
                    ("error", error.code().into()),
                    ("message", error.to_string().into()),
                    ("kept_entries", kept.map_or(Value::Null, Value::from)),
                    ("failing_closed", kept.is_none().into()),
                ],
            ),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_client_chosen_value_cannot_forge_a_line() {
        let forged = "tester\n2026-01-01T00:00:00.000Z info request status=200 \"x\"";
        for format in [LogFormat::Text, LogFormat::Json] {
            let buf = Buf::default();
            let log = Log::new(format, Box::new(buf.clone()));
            log.line(
                "info",
                "request",
                vec![("principal", forged.into()), ("path", "/v1/release".into()), ("gone", Value::Null)],
            );
            let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
            assert_eq!(text.lines().count(), 1, "{text}");
            assert!(!text.contains("gone"), "{text}");
            match format {
                LogFormat::Text => {
                    assert!(text.contains(" info request principal=\"tester\\n2026"), "{text}");
                    assert!(text.contains(" path=/v1/release"), "{text}");
                }
                LogFormat::Json => {
                    let v: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(
                        (&v["principal"], &v["event"], &v["level"]),
                        (&forged.into(), &"request".into(), &"info".into())
                    );
                }
            }
        }
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert!("yaml".parse::<LogFormat>().is_err());
    }
}
