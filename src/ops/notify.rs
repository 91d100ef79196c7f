//! sd_notify(3) without libsystemd: one datagram per message to `$NOTIFY_SOCKET`. Without the
//! variable (not under systemd) every call is a no-op, so the daemon behaves the same.

use std::os::unix::net::UnixDatagram;

#[derive(Debug, Clone)]
pub struct Notifier {
    socket: Option<std::path::PathBuf>,
    abstract_name: Option<Vec<u8>>,
}

impl Notifier {
    pub fn from_env() -> Self {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(s) if s.starts_with('@') => Notifier {
                socket: None,
                abstract_name: Some(s.as_bytes()[1..].to_vec()),
            },
            Ok(s) if !s.is_empty() => Notifier {
                socket: Some(s.into()),
                abstract_name: None,
            },
            _ => Notifier {
                socket: None,
                abstract_name: None,
            },
        }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some() || self.abstract_name.is_some()
    }

    /// Sends `state` (e.g. "READY=1\nSTATUS=..."); errors are ignored as systemd does. The
    /// send never blocks (it runs on async threads): a full socket queue drops this one message,
    /// and the next status or watchdog ping follows within the interval.
    pub fn notify(&self, state: &str) {
        let Ok(sock) = UnixDatagram::unbound() else {
            return;
        };
        if sock.set_nonblocking(true).is_err() {
            return;
        }
        if let Some(path) = &self.socket {
            let _ = sock.send_to(state.as_bytes(), path);
        } else if let Some(name) = &self.abstract_name {
            use std::os::linux::net::SocketAddrExt;
            if let Ok(addr) = std::os::unix::net::SocketAddr::from_abstract_name(name) {
                let _ = sock.send_to_addr(state.as_bytes(), &addr);
            }
        }
    }

    /// The watchdog interval systemd expects pings within (`WATCHDOG_USEC`), if any.
    pub fn watchdog_interval() -> Option<std::time::Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.parse::<u32>().ok() != Some(std::process::id()) {
                return None;
            }
        }
        (usec > 0).then(|| std::time::Duration::from_micros(usec))
    }
}
