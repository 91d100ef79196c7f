//! Where the CLI finds the HMAC secret: --secret-file, HMAC_SECRET, or the systemd credential.

use crate::audit::{Secret, SecretError};
use clap::Args;
use std::path::PathBuf;

/// The systemd credential name (`LoadCredential=hmac_secret:...`).
pub const CREDENTIAL_NAME: &str = "hmac_secret";

#[derive(Args, Debug, Clone, Default)]
pub struct SecretArgs {
    /// Read the HMAC secret from this file (e.g. a systemd credential). Overrides HMAC_SECRET.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Run without a secret: logs are written unsigned (Lár's behaviour without hmac_secret).
    #[arg(long)]
    pub unsigned: bool,
}

impl SecretArgs {
    /// `Ok(None)` only with --unsigned; no secret and no --unsigned is an error.
    pub fn resolve(&self) -> Result<Option<Secret>, SecretError> {
        if let Some(path) = &self.secret_file {
            return Secret::from_file(path).map(Some);
        }
        if let Ok(text) = std::env::var("HMAC_SECRET") {
            if !text.is_empty() {
                return Secret::new(&text).map(Some);
            }
        }
        if let Ok(dir) = std::env::var("CREDENTIALS_DIRECTORY") {
            let path = PathBuf::from(dir).join(CREDENTIAL_NAME);
            if path.exists() {
                return Secret::from_file(&path).map(Some);
            }
        }
        if self.unsigned {
            return Ok(None);
        }
        Err(SecretError::Missing)
    }

    /// As [`SecretArgs::resolve`], with the worker config's `secret_file` and `unsigned` as
    /// defaults: the daemon and the commands that act for it (`decide`) find the same secret.
    pub fn resolve_for(
        &self,
        config: &crate::config::Config,
    ) -> Result<Option<Secret>, SecretError> {
        let mut args = self.clone();
        if args.secret_file.is_none() {
            args.secret_file = config.worker.secret_file.clone();
        }
        args.unsigned |= config.worker.unsigned;
        args.resolve()
    }

    /// For commands that cannot work without a secret (verify).
    pub fn require(&self) -> Result<Secret, SecretError> {
        match self.resolve() {
            Ok(Some(s)) => Ok(s),
            Ok(None) | Err(SecretError::Missing) => Err(SecretError::Missing),
            Err(e) => Err(e),
        }
    }
}
