//! Credentials masked out of URLs before they reach a log, an error or a status line. One
//! home, used by the config's error messages and by every backend's connection errors.

/// The url with its password masked, for logs and errors.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", mask_credentials(rest)),
        None => url.to_string(),
    }
}

/// The part of a url after `scheme://`, with the password of `user:password@host` masked.
pub fn mask_credentials(rest: &str) -> String {
    match rest.rsplit_once('@') {
        Some((cred, host)) => {
            let user = cred.split(':').next().unwrap_or("");
            format!("{user}:***@{host}")
        }
        None => rest.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_is_masked_and_a_plain_url_kept() {
        assert_eq!(
            redact("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(mask_credentials("u:p@h"), "u:***@h");
        // The last '@' separates the host: a password holding '@' is masked whole.
        assert_eq!(mask_credentials("u:p@ss@h"), "u:***@h");
        assert_eq!(redact("no scheme"), "no scheme");
    }
}
