//! Operating the daemon: systemd notifications (readiness, status, watchdog, stopping), the
//! readiness checks they share with the admin HTTP port, and Prometheus metrics.

pub mod admin;
pub mod health;
pub mod metrics;
pub mod notify;
