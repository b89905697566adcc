//! Talking to systemd: readiness, status lines, watchdog pings and shutdown
//! (the `sd_notify(3)` protocol: one datagram of `KEY=VALUE` lines to `$NOTIFY_SOCKET`).
//!
//! We use the `sd-notify` crate rather than the `systemd` crate (or libsystemd): it is
//! pure Rust and only speaks the socket protocol, so the binary does not link
//! `libsystemd.so`. That keeps the aarch64 cross-build free of a target libsystemd
//! (no sysroot package to find, no pkg-config for a foreign target), lets the same
//! binary run on minimal images and in containers without systemd, and removes one
//! glibc-versioned shared library from what must match JetPack's userland.
//! Logging needs no library either: under systemd, stderr goes to journald.
//!
//! Every function is a no-op when `NOTIFY_SOCKET` is unset (run by hand, in tests,
//! under another supervisor). A failed send is logged, never fatal: systemd will
//! notice on its own (start timeout, missed watchdog) and restart us.

use std::time::Duration;

use sd_notify::NotifyState;

/// Whether a service manager is listening (`NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// `READY=1`: start-up is complete. Send it only once the DICOM port accepts
/// connections, the model is loaded and the outbox is open: `Type=notify` units
/// that depend on us start as soon as this arrives.
pub fn ready() {
    send(&[NotifyState::Ready], "READY=1");
}

/// `STATUS=...`: one line shown by `systemctl status`. Newlines would end the
/// field early (each line of the datagram is one assignment), so they become spaces.
pub fn status(text: &str) {
    let line = one_line(text);
    send(&[NotifyState::Status(&line)], "STATUS");
}

/// `WATCHDOG=1`: we are alive. Only [`super::health`] should call this, and only
/// while every pipeline stage is making progress.
pub fn watchdog() {
    send(&[NotifyState::Watchdog], "WATCHDOG=1");
}

/// `STOPPING=1`: shutdown has begun (SIGTERM received); systemd stops expecting
/// watchdog pings and waits for the process to exit.
pub fn stopping() {
    send(&[NotifyState::Stopping], "STOPPING=1");
}

/// The watchdog timeout systemd enforces (`WatchdogSec=` of the unit, passed as
/// `WATCHDOG_USEC`), or `None` when no watchdog is configured for this process.
/// Pings should be sent at least twice per interval (`sd_watchdog_enabled(3)`).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

fn send(state: &[NotifyState], what: &str) {
    if let Err(err) = sd_notify::notify(state) {
        log::warn!(
            "cannot send {what} to systemd via NOTIFY_SOCKET={:?}: {err}",
            std::env::var_os("NOTIFY_SOCKET").unwrap_or_default()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_a_single_line() {
        assert_eq!(one_line("2 queued\nlast: ok\r\n"), "2 queued last: ok  ");
    }
}
