//! Log lines on stderr, one per event, shaped for PostgreSQL's server log
//! where archive_command's output ends up: `walvault: <level>: <message>`.

use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

struct OneLine;

impl<S, N> FormatEvent<S, N> for OneLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = match *event.metadata().level() {
            Level::ERROR => "error",
            Level::WARN => "warning",
            Level::INFO => "info",
            Level::DEBUG => "debug",
            Level::TRACE => "trace",
        };
        write!(writer, "walvault: {level}: ")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// `verbosity`: -1 quiet (warnings and errors), 0 normal, 1 debug, 2+ trace.
pub fn init(verbosity: i8) {
    let level = match verbosity {
        i8::MIN..=-1 => Level::WARN,
        0 => Level::INFO,
        1 => Level::DEBUG,
        _ => Level::TRACE,
    };
    // Only our own events below INFO: dependencies' debug output is noise
    // (and could carry request details) in a server log.
    let filter = tracing_subscriber::filter::Targets::new()
        .with_target("walvault", level)
        .with_default(Level::WARN.min(level).max(Level::WARN));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .event_format(OneLine),
        )
        .with(filter)
        .try_init();
}
