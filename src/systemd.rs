//! systemd integration (`Type=notify`): tell the service manager when the gateway is ready,
//! reloading and stopping, and keep its watchdog fed.
//!
//! Every call is a no-op when the process was not started by systemd (no `NOTIFY_SOCKET`), so
//! tests and plain runs need nothing. A notification that cannot be sent is logged at debug
//! level and otherwise ignored: the gateway serves either way.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// `READY=1`: listeners are bound and requests are served (also after a reload).
pub fn ready() {
    notify(&[NotifyState::Ready]);
}

/// `STOPPING=1`: shutdown began; connections are draining.
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// `RELOADING=1`, with the `MONOTONIC_USEC` that systemd 253 and newer require next to it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// The watchdog interval systemd asked for (`WatchdogSec=`), if any, for this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Send `WATCHDOG=1` at half the watchdog interval until `stop`; returns at once when systemd
/// set no watchdog. Runs on the same runtime as the server, so a wedged runtime stops the
/// pings and systemd restarts the service.
pub async fn feed_watchdog(stop: CancellationToken) {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => notify(&[NotifyState::Watchdog]),
        }
    }
}
