//! Log setup shared by the project's daemons (`storaged serve`, `migrated`, `vmm`).

/// Sends `tracing` events to stderr, filtered by `RUST_LOG` (default `info`): as text, coloured
/// only on a terminal, or as JSON lines when `json` is set.
pub fn init(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        b.json().init();
    } else {
        b.init();
    }
}
