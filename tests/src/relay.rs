//! A TCP relay on loopback in front of the apiserver that counts the bytes the
//! apiserver sends through it: what one client received, as it crossed the wire
//! (TLS records and HTTP framing included), whatever the client does with it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::cluster::ControlPlane;

pub struct Relay {
    port: u16,
    received: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Relays every connection made to it to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, counter.clone()));
            }
        });
        Ok(Self {
            port,
            received,
            accept,
        })
    }

    /// Bytes sent by the upstream to every client so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// A copy of the admin kubeconfig of `cp` that reaches its apiserver through
    /// this relay (the serving certificate is for 127.0.0.1, whatever the port).
    pub fn admin_kubeconfig(&self, cp: &ControlPlane, dir: &Path) -> Result<PathBuf> {
        let text = std::fs::read_to_string(cp.admin_kubeconfig())?;
        let path = dir.join(format!("relay-{}.kubeconfig", self.port));
        let relayed = format!("https://127.0.0.1:{}", self.port);
        std::fs::write(&path, text.replace(cp.server(), &relayed))?;
        Ok(path)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The apiserver's address, from `https://<address>:<port>`.
pub fn apiserver_addr(cp: &ControlPlane) -> Result<SocketAddr> {
    let server = cp.server();
    server
        .trim_start_matches("https://")
        .parse()
        .with_context(|| format!("apiserver address {server}"))
}

async fn relay(client: TcpStream, upstream: SocketAddr, received: Arc<AtomicU64>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
        let _ = to_server.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = from_server.read(&mut buf).await {
            if n == 0 || to_client.write_all(&buf[..n]).await.is_err() {
                break;
            }
            received.fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = to_client.shutdown().await;
    };
    tokio::join!(up, down);
}
