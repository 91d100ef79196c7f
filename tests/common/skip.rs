//! Loud skips, included with `#[path]` by the tests that need them: a test that cannot run here
//! (a tool missing, a remote broker) fails with its reason, unless the one variable
//! `LAR_TEST_ALLOW_SKIPS=1` says skips are acceptable on this machine. A green run then always
//! means the test ran.

/// Skips the calling test when skips are allowed (returns `true`: the caller returns), else
/// panics with the reason.
pub fn skip_or_fail(test: &str, reason: &str) -> bool {
    if std::env::var("LAR_TEST_ALLOW_SKIPS").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: {reason} (LAR_TEST_ALLOW_SKIPS=1)");
        return true;
    }
    panic!("{test} cannot run here: {reason}; set LAR_TEST_ALLOW_SKIPS=1 to skip it knowingly");
}

/// Whether the local `rabbitmqctl` controls the broker at `url`: the url's host is this
/// machine and the node's AMQP listener is the url's port. A probe of just any local node
/// would stop or alarm a broker the test does not talk to.
pub fn rabbitmqctl_controls(url: &str) -> Result<(), String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let host_port = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
    let host_port = host_port.split('/').next().unwrap_or(host_port);
    let (host, port) = match host_port.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>().map_err(|_| format!("bad port in {url}"))?,
        ),
        None => (host_port, 5672),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let local = matches!(host, "localhost" | "::1") || host.starts_with("127.");
    if !local {
        return Err(format!("the broker {host}:{port} is not on this machine"));
    }
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "status", "--formatter", "json"])
        .output()
        .map_err(|e| format!("rabbitmqctl cannot be run: {e}"))?;
    if !out.status.success() {
        return Err("rabbitmqctl status failed: no local node".into());
    }
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("rabbitmqctl status is not JSON: {e}"))?;
    let listens = status["listeners"].as_array().is_some_and(|ls| {
        ls.iter().any(|l| {
            l["port"].as_u64() == Some(u64::from(port))
                && l["protocol"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("amqp"))
        })
    });
    if listens {
        Ok(())
    } else {
        Err(format!(
            "the local node does not listen for AMQP on port {port}"
        ))
    }
}
