//! The log: `tracing` events to stderr, as text for people or as JSON lines for log
//! pipelines (`--log-format json`: one object per event, its fields at the top level next to
//! `timestamp`, `level`, `target` and `message`).

use tracing_subscriber::{EnvFilter, fmt::MakeWriter};

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `RUST_LOG`, else info without kube's client builder (it logs every failed request at
/// ERROR; lb reports API trouble itself, once per outage, with what it means).
fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube_client::client::builder=off"))
}

/// The subscriber for `format`, writing to `writer`.
fn subscriber<W>(
    format: LogFormat,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .finish(),
        ),
    }
}

/// Logs to stderr in `format` from now on.
pub fn init(format: LogFormat) {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // try_init also routes the `log` crate's records (aya's) into the same subscriber.
    if tracing_subscriber::util::SubscriberInitExt::try_init(subscriber(
        format,
        std::io::stderr,
        ansi,
    ))
    .is_err()
    {
        eprintln!("lb: a logger was already set");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use rstest::rstest;

    use super::*;

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Self;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    fn log_one(format: LogFormat) -> String {
        let buffer = Buffer::default();
        let subscriber = subscriber(format, buffer.clone(), false);
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(map = "LB_FRONTENDS", entries = 4, "map nearly full");
        });
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[rstest]
    #[case::text(LogFormat::Text)]
    #[case::json(LogFormat::Json)]
    fn events_keep_their_fields(#[case] format: LogFormat) {
        let line = log_one(format);
        assert_eq!(line.lines().count(), 1, "{line}");
        match format {
            LogFormat::Text => {
                assert!(line.contains("WARN"), "{line}");
                assert!(
                    line.contains("map nearly full map=\"LB_FRONTENDS\" entries=4"),
                    "{line}"
                );
            }
            LogFormat::Json => {
                let json: serde_json::Value = serde_json::from_str(&line).unwrap();
                assert_eq!(json["level"], "WARN");
                assert_eq!(json["message"], "map nearly full");
                assert_eq!(json["map"], "LB_FRONTENDS");
                assert_eq!(json["entries"], 4);
                assert!(json["timestamp"].is_string());
            }
        }
    }
}
