//! TLS under tonic: an accept loop that completes handshakes off the accept path (a client that
//! never finishes one holds only its own task, for at most [`HANDSHAKE_TIMEOUT`]) and hands tonic
//! connections that carry who is on the other end ([`PeerInfo`], read by handlers from the request
//! extensions); and a connector for channels that dial with the current client configuration and
//! check the server's certificate names what was dialled.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, ServerConfig, pki_types::ServerName};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, TlsConnector, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri, server::Connected};

use crate::WorkloadId;

/// How long a client may take to complete a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once per listener; more connections wait to be accepted.
pub const MAX_HANDSHAKES: usize = 256;

/// Who is on the other end of an accepted connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The client's address.
    pub remote: Option<SocketAddr>,
    /// The identity its (chain-verified) certificate carries; `None` if it presented none (a
    /// server that does not require one) or one without a qmesh identity (`refusal` says why).
    pub identity: Option<Arc<WorkloadId>>,
    /// Why the certificate carries no usable identity.
    pub refusal: Option<String>,
}

impl PeerInfo {
    /// The identity, or `PERMISSION_DENIED` naming what is missing.
    pub fn require(info: Option<&Self>) -> Result<Arc<WorkloadId>, tonic::Status> {
        match info {
            Some(Self {
                identity: Some(id), ..
            }) => Ok(Arc::clone(id)),
            Some(Self {
                refusal: Some(why), ..
            }) => Err(tonic::Status::permission_denied(format!(
                "the client certificate carries no qmesh identity: {why}"
            ))),
            _ => Err(tonic::Status::permission_denied(
                "this port requires a client certificate issued by the mesh CA",
            )),
        }
    }
}

/// An accepted TLS connection.
#[derive(Debug)]
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Where a server's configuration for the next handshake comes from.
pub type ServerConfigs = Arc<dyn Fn() -> Arc<ServerConfig> + Send + Sync>;
/// Where a client's configuration for the next connection comes from.
pub type ClientConfigs = Arc<dyn Fn() -> Arc<ClientConfig> + Send + Sync>;

/// Connections accepted on `listener`, TLS done with the configuration `configs` gives at each
/// accept. Failed handshakes are logged and dropped; the stream ends when the listener fails.
pub fn accept(
    listener: TcpListener,
    configs: ServerConfigs,
) -> ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: try again shortly.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(configs());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let stream =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::info!(%remote, error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                let (identity, refusal) = match stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                {
                    Some(cert) => match WorkloadId::from_certificate(cert) {
                        Ok(id) => (Some(Arc::new(id)), None),
                        Err(e) => (None, Some(e.to_string())),
                    },
                    None => (None, None),
                };
                let info = PeerInfo {
                    remote: Some(remote),
                    identity,
                    refusal,
                };
                let _ = tx.send(Ok(TlsConn { stream, info })).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A channel to `endpoint` over TLS: each (re)connect uses the configuration `configs` gives
/// then, and the server must present a certificate valid for `server_name` (a sidecar's
/// [`crate::sidecar_dns_name`], or the control plane's host). Connects lazily.
pub fn channel(
    endpoint: &Endpoint,
    configs: ClientConfigs,
    server_name: &str,
) -> Result<Channel, crate::Error> {
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| {
        crate::Error::Identity(format!("{server_name:?} is not a server name: {e}"))
    })?;
    Ok(endpoint.connect_with_connector_lazy(connector(configs, name)))
}

/// Like [`channel`], connected now.
pub async fn connect(
    endpoint: &Endpoint,
    configs: ClientConfigs,
    server_name: &str,
) -> Result<Channel, ConnectError> {
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| {
        ConnectError::Identity(crate::Error::Identity(format!(
            "{server_name:?} is not a server name: {e}"
        )))
    })?;
    endpoint
        .connect_with_connector(connector(configs, name))
        .await
        .map_err(ConnectError::Transport)
}

/// A channel over TLS on connections `dial` opens — a Kubernetes port-forward, say — verified
/// with `config`; the server's certificate must be valid for `server_name`. Connects lazily, and
/// dials again when a connection is lost.
pub fn channel_over<IO, D, F>(
    endpoint: &Endpoint,
    config: Arc<ClientConfig>,
    server_name: &str,
    dial: D,
) -> Result<Channel, crate::Error>
where
    D: Fn() -> F + Clone + Send + Sync + 'static,
    F: Future<Output = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Dialled<IO> = Pin<
        Box<dyn Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<IO>>>> + Send>,
    >;
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| {
        crate::Error::Identity(format!("{server_name:?} is not a server name: {e}"))
    })?;
    let connector = tower::service_fn(move |_: Uri| {
        let (dial, config, name) = (dial.clone(), Arc::clone(&config), name.clone());
        let fut: Dialled<IO> = Box::pin(async move {
            let io = dial().await?;
            let tls = TlsConnector::from(config).connect(name, io).await?;
            Ok(TokioIo::new(tls))
        });
        fut
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server name is not usable.
    #[error("{0}")]
    Identity(crate::Error),
    /// Connecting (TCP or TLS) failed.
    #[error("{0}")]
    Transport(#[source] tonic::transport::Error),
}

/// A TLS connection a channel runs on.
type ClientIo = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
type Connecting = Pin<Box<dyn Future<Output = io::Result<ClientIo>> + Send>>;

fn connector(
    configs: ClientConfigs,
    name: ServerName<'static>,
) -> impl tower::Service<Uri, Response = ClientIo, Error = io::Error, Future = Connecting>
+ Clone
+ Send
+ 'static {
    tower::service_fn(move |uri: Uri| {
        let configs = Arc::clone(&configs);
        let name = name.clone();
        let fut: Connecting = Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host in the URI"))?
                .as_str()
                .to_owned();
            let tcp = TcpStream::connect(authority).await?;
            tcp.set_nodelay(true)?;
            let tls = TlsConnector::from(configs()).connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        });
        fut
    })
}

/// A channel to a control plane at `url`: `https://` verified against `bundle_pem` (the server's
/// certificate must be valid for the URL's host), `http://` plaintext. `configure` sets timeouts
/// and the like on the endpoint.
pub async fn connect_url(
    url: &str,
    bundle_pem: Option<&str>,
    configure: impl FnOnce(Endpoint) -> Endpoint,
) -> Result<Channel, UrlError> {
    let Some(rest) = url.strip_prefix("https://") else {
        let endpoint =
            configure(Endpoint::from_shared(url.to_owned()).map_err(UrlError::Transport)?);
        return endpoint.connect().await.map_err(UrlError::Transport);
    };
    let plain =
        configure(Endpoint::from_shared(format!("http://{rest}")).map_err(UrlError::Transport)?);
    let host = plain
        .uri()
        .host()
        .ok_or_else(|| UrlError::Setup(format!("{url:?} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let bundle = bundle_pem
        .ok_or_else(|| UrlError::Setup(format!("no trust bundle to verify {url} with")))?;
    let config =
        Arc::new(crate::tls::verifying_client(bundle).map_err(|e| UrlError::Setup(e.to_string()))?);
    connect(&plain, Arc::new(move || Arc::clone(&config)), &host)
        .await
        .map_err(|e| match e {
            ConnectError::Identity(e) => UrlError::Setup(e.to_string()),
            ConnectError::Transport(e) => UrlError::Transport(e),
        })
}

/// Why [`connect_url`] failed.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// The URL, the bundle or the name is unusable.
    #[error("{0}")]
    Setup(String),
    /// Connecting failed.
    #[error("{0}")]
    Transport(#[source] tonic::transport::Error),
}
