//! A TCP proxy the test controls, standing in front of one sidecar's peer port: everything other
//! sidecars send to it goes through here, so a test can cut it off from the mesh.
//!
//! ```text
//!   other sidecars ──▶ proxy (127.x.y.z:free) ──▶ sidecar's real peer port
//!                        Pass: bytes flow both ways
//!                        Blackhole: connections stay open, nothing gets through (a partition:
//!                                   TCP holds what was sent, and delivers it if the link heals
//!                                   before a timeout ends the connection)
//!                        Reset: every connection is closed, new ones are refused at once
//! ```

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ProxyMode {
    /// Forward everything.
    Pass = 0,
    /// Keep connections, forward nothing (a partition). Nothing is read either: TCP keeps what was
    /// sent, as it does when packets are lost and retransmitted — a connection never loses bytes
    /// in the middle and carries on, which would be no network's behaviour.
    Blackhole = 1,
    /// Close every connection and refuse new ones (the peer is unreachable).
    Reset = 2,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    /// Where peers connect.
    pub listen: SocketAddr,
    mode: Arc<AtomicU8>,
    changed: watch::Sender<u8>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy on `listen` forwarding to `target`.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let mode = Arc::new(AtomicU8::new(ProxyMode::Pass as u8));
        let (changed, _) = watch::channel(ProxyMode::Pass as u8);
        let task = {
            let mode = Arc::clone(&mode);
            let changed = changed.clone();
            tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    if mode.load(Ordering::SeqCst) == ProxyMode::Reset as u8 {
                        drop(inbound);
                        continue;
                    }
                    let mode = Arc::clone(&mode);
                    let rx = changed.subscribe();
                    tokio::spawn(async move {
                        let _ = inbound.set_nodelay(true);
                        let Ok(Ok(outbound)) = tokio::time::timeout(
                            Duration::from_secs(2),
                            TcpStream::connect(target),
                        )
                        .await
                        else {
                            return;
                        };
                        let _ = outbound.set_nodelay(true);
                        let (ri, wi) = inbound.into_split();
                        let (ro, wo) = outbound.into_split();
                        tokio::select! {
                            () = pump(ri, wo, Arc::clone(&mode), rx.clone()) => {}
                            () = pump(ro, wi, mode, rx) => {}
                        }
                    });
                }
            })
        };
        Ok(Self {
            listen,
            mode,
            changed,
            task,
        })
    }

    /// Switches the proxy's behaviour for current and new connections.
    pub fn set(&self, mode: ProxyMode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
        let _ = self.changed.send(mode as u8);
    }

    /// The current behaviour.
    pub fn mode(&self) -> ProxyMode {
        match self.mode.load(Ordering::SeqCst) {
            1 => ProxyMode::Blackhole,
            2 => ProxyMode::Reset,
            _ => ProxyMode::Pass,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction while the mode allows; returns when either side closes or on Reset.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
    mut changed: watch::Receiver<u8>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match mode.load(Ordering::SeqCst) {
            m if m == ProxyMode::Reset as u8 => return,
            m if m == ProxyMode::Blackhole as u8 => {
                // Nothing moves until the mode changes: the sender's bytes wait in the kernel's
                // buffers (and then in its own), like a link that drops packets TCP resends.
                if changed.changed().await.is_err() {
                    return;
                }
            }
            _ => {
                tokio::select! {
                    n = from.read(&mut buf) => match n {
                        Ok(0) | Err(_) => return,
                        Ok(n) => if to.write_all(&buf[..n]).await.is_err() { return },
                    },
                    r = changed.changed() => if r.is_err() { return },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{free_ports_on, loopback_ip};

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((loopback_ip(), 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn passes_blackholes_and_resets() {
        let target = echo_server().await;
        let ip = loopback_ip();
        let proxy = Proxy::start(
            SocketAddr::from((ip, free_ports_on::<1>(ip).unwrap()[0])),
            target,
        )
        .await
        .unwrap();
        let mut c = TcpStream::connect(proxy.listen).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        proxy.set(ProxyMode::Blackhole);
        c.write_all(b"held").await.unwrap();
        let silent = tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf)).await;
        assert!(silent.is_err(), "a blackholed connection delivered bytes");
        // Healed in time: what was sent meanwhile arrives, nothing lost in the middle.
        proxy.set(ProxyMode::Pass);
        tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut buf))
            .await
            .expect("bytes held by a partition arrive once it heals")
            .unwrap();
        assert_eq!(&buf, b"held");

        proxy.set(ProxyMode::Reset);
        let closed = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
            .await
            .expect("reset closes the connection");
        assert!(matches!(closed, Ok(0) | Err(_)));
        assert_eq!(proxy.mode(), ProxyMode::Reset);
    }
}
