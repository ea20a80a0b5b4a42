//! Kubeconfig files for the identities the tests run as.

use std::path::Path;

use anyhow::Result;
use base64::Engine;

use crate::certs::CertPair;

/// Writes a kubeconfig that reaches `server`, trusting `ca_pem`, as the
/// client certificate's identity.
pub fn write_cert_kubeconfig(
    path: &Path,
    server: &str,
    ca_pem: &str,
    user: &str,
    client: &CertPair,
) -> Result<()> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let auth = format!(
        "    client-certificate-data: {}\n    client-key-data: {}\n",
        b64(&client.cert_pem),
        b64(&client.key_pem)
    );
    write(path, server, &b64(ca_pem), user, &auth)
}

/// Writes a kubeconfig that authenticates with a bearer token (a
/// ServiceAccount's, as an in-cluster pod would).
pub fn write_token_kubeconfig(
    path: &Path,
    server: &str,
    ca_pem: &str,
    user: &str,
    token: &str,
) -> Result<()> {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    write(path, server, &ca, user, &format!("    token: {token}\n"))
}

fn write(path: &Path, server: &str, ca_b64: &str, user: &str, auth: &str) -> Result<()> {
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: localship-test
  cluster:
    server: {server}
    certificate-authority-data: {ca_b64}
users:
- name: {user}
  user:
{auth}contexts:
- name: {user}
  context:
    cluster: localship-test
    user: {user}
current-context: {user}
"
    );
    std::fs::write(path, text)?;
    Ok(())
}
