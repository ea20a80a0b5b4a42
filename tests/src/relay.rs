//! A TCP relay on loopback in front of the apiserver that counts the bytes the
//! apiserver sends through it: what one client received, as it crossed the wire
//! (TLS records and HTTP framing included), whatever the client does with it.
//!
//! It can also cut the path without closing it, as a load balancer failing over or a cut
//! network does: [`Relay::blackhole`] keeps every connection open and carries no byte
//! more, and [`Relay::heal`] lets new connections through while the old ones stay silent.
//! A real apiserver cannot do that: stopped, its connections close.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::cluster::ControlPlane;

pub struct Relay {
    port: u16,
    received: Arc<AtomicU64>,
    path: Arc<Line>,
    accept: JoinHandle<()>,
}

/// Whether the path is cut, and which connections it cut for good.
#[derive(Default)]
struct Line {
    cut: AtomicBool,
    /// Raised by each cut: a connection made before carries nothing after it.
    generation: AtomicU64,
}

impl Relay {
    /// Relays every connection made to it to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        let path = Arc::new(Line::default());
        let cut = path.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, counter.clone(), cut.clone()));
            }
        });
        Ok(Self {
            port,
            received,
            path,
            accept,
        })
    }

    /// Cuts the path without closing anything: open connections carry no byte more, ever,
    /// and new ones are accepted and carry nothing either.
    pub fn blackhole(&self) {
        self.path.generation.fetch_add(1, Ordering::SeqCst);
        self.path.cut.store(true, Ordering::SeqCst);
    }

    /// New connections go through again; those cut stay silent.
    pub fn heal(&self) {
        self.path.cut.store(false, Ordering::SeqCst);
    }

    /// Bytes sent by the upstream to every client so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// A copy of the admin kubeconfig of `cp` that reaches its apiserver through
    /// this relay (the serving certificate is for 127.0.0.1, whatever the port).
    pub fn admin_kubeconfig(&self, cp: &ControlPlane, dir: &Path) -> Result<PathBuf> {
        self.kubeconfig(cp, cp.admin_kubeconfig(), dir)
    }

    /// A copy of `kubeconfig`, one of `cp`'s, that reaches its apiserver through this relay.
    pub fn kubeconfig(&self, cp: &ControlPlane, kubeconfig: &Path, dir: &Path) -> Result<PathBuf> {
        let text = std::fs::read_to_string(kubeconfig)?;
        let name = kubeconfig.file_name().unwrap_or_default().to_string_lossy();
        let path = dir.join(format!("relay-{}-{name}", self.port));
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

async fn relay(client: TcpStream, upstream: SocketAddr, received: Arc<AtomicU64>, path: Arc<Line>) {
    if path.cut.load(Ordering::SeqCst) {
        // Accepted, and never answered.
        let _held = client;
        return std::future::pending().await;
    }
    let generation = path.generation.load(Ordering::SeqCst);
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let open = || path.generation.load(Ordering::SeqCst) == generation;
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let up = pump(&mut from_client, &mut to_server, &open, None);
    let down = pump(&mut from_server, &mut to_client, &open, Some(&received));
    tokio::join!(up, down);
    if !open() {
        // Cut: both ends stay open and silent, as behind a dead path.
        let _held = (from_client, to_client, from_server, to_server);
        std::future::pending::<()>().await;
    }
}

/// Copies `from` to `to` until either end closes or the path is cut, adding what went through
/// to `counted`. The write side is shut only while the path is open: a cut one stays silent.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    open: &impl Fn() -> bool,
    counted: Option<&AtomicU64>,
) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || !open() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if let Some(counted) = counted {
            counted.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    if open() {
        let _ = to.shutdown().await;
    }
}
