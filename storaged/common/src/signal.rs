//! Waiting for the signals that ask a daemon to stop.

/// Waits for SIGTERM or SIGINT; returns the signal's name. Fails only if the handlers cannot
/// be installed (then nothing would ever stop the daemon through a signal).
pub async fn stop_requested() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
