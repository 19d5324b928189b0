//! The command-line client's shared pieces: how it reaches the REST API and prints answers.

pub(crate) mod import;
pub(crate) mod volume;

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use storaged_client::rest::StoragedApi;
use vmhop_common::token::Token;

#[derive(Args, Clone)]
pub(crate) struct ApiArgs {
    /// Address of the storaged REST API.
    #[arg(long, env = "STORAGED_API", default_value = "127.0.0.1:10810")]
    pub(crate) api: String,
    /// File with the API's token, when the server has one (`serve --api-token-file`).
    #[arg(long, env = "STORAGED_TOKEN_FILE")]
    pub(crate) token_file: Option<PathBuf>,
}

impl ApiArgs {
    pub(crate) fn client(self) -> Result<StoragedApi> {
        let token = self.token_file.as_deref().map(Token::load).transpose()?;
        Ok(StoragedApi::new(&self.api, token))
    }
}

pub(crate) fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num.parse().with_context(|| format!("size {s:?}"))?;
    n.checked_mul(mult).context("size overflows")
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
