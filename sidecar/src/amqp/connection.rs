//! One AMQP connection: the handshake (start, tune, open), then channels. A reader task turns bytes
//! into frames (refusing any larger than the negotiated `frame-max`); this task owns every channel's
//! state, writes every frame, runs publishes in order (so confirms come back in order) and takes
//! deliveries from one consumer task per `basic.consume`.
//!
//! `tx.select` makes a channel transactional on qmesh transactions: its publishes until `tx.commit`
//! are half messages of one transaction (opened at the first), its acks, nacks and rejects wait for
//! the commit, and `tx.rollback` (or closing the channel) drops both.
//!
//! Errors follow the spec: a soft error closes the channel (`channel.close` with a reply code and
//! a text saying what to do), a hard one the connection. Nothing accepted is lost either way —
//! unacked deliveries go back to their owners when their channel closes.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use amq_protocol::{
    frame::{AMQPContentHeader, AMQPFrame, ProtocolVersion, WriteContext, gen_frame},
    protocol::{
        AMQPClass, BasicProperties, basic, channel, confirm, connection, exchange, queue, tx,
    },
    types::{AMQPValue, FieldTable, ShortString},
};
use futures::{FutureExt, StreamExt, stream::FuturesOrdered};
use qmesh_proto::v1;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{Notify, mpsc, watch},
    task::AbortHandle,
};

use super::{
    Settings,
    frames::{Reply, read_frames, reply},
    message,
};
use crate::{
    Sidecar,
    consumer::{Consumers, Holder, LocalSub, MAX_WINDOW, Nack},
    error::BrokerError,
    owner::{Schedule, transactions::Decision},
};

/// Most publishes of one connection being stored at once; reading pauses beyond it.
const PIPELINE: usize = 256;
/// Most body bytes one connection buffers (contents being received and publishes being stored).
const MAX_BUFFERED_BYTES: u64 = 128 * 1024 * 1024;
/// Time allowed for the handshake, and for the client's `close-ok`.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// The smallest `frame-max` the spec lets a peer ask for.
const FRAME_MIN: u32 = 4096;
/// The consume argument that names the Subscription when several of the queue's serve this pod.
pub const SUBSCRIPTION_ARGUMENT: &str = "x-qmesh-subscription";
/// How long `basic.get` waits for a delivery before answering `get-empty`.
const GET_WAIT: Duration = Duration::from_millis(200);

/// Why the connection or a channel ends.
#[derive(Debug)]
enum Fault {
    /// Close this channel with a reply code (a soft error).
    Channel(u16, Reply),
    /// Close the connection with a reply code (a hard error).
    Connection(Reply),
    /// The client closed the connection (answered) or the socket went away.
    Gone(String),
}

fn not_implemented(method: &AMQPClass, name: &str, hint: &str) -> Reply {
    Reply::new(
        reply::NOT_IMPLEMENTED,
        format!("{name} is not supported by qmesh{hint}"),
    )
    .about(method)
}

/// A client method qmesh does not support: its name and what to do instead (answered with 540).
fn unsupported(method: &AMQPClass) -> Option<(&'static str, &'static str)> {
    Some(match method {
        AMQPClass::Basic(basic::AMQPMethod::Recover(_) | basic::AMQPMethod::RecoverAsync(_)) => {
            ("basic.recover", "; nack with requeue=true instead")
        }
        AMQPClass::Queue(queue::AMQPMethod::Bind(_) | queue::AMQPMethod::Unbind(_)) => (
            "queue.bind",
            "; Subscriptions route a Queue's messages (kubectl apply a Subscription)",
        ),
        AMQPClass::Queue(queue::AMQPMethod::Purge(_)) => {
            ("queue.purge", "; use `qmesh dlq purge` for held messages")
        }
        AMQPClass::Queue(queue::AMQPMethod::Delete(_)) => (
            "queue.delete",
            "; queues come from Queue resources (kubectl delete queue)",
        ),
        AMQPClass::Exchange(_) => (
            "this exchange method",
            "; qmesh has the default exchange only",
        ),
        AMQPClass::Access(_) => ("access.request", ""),
        _ => return None,
    })
}

/// What consumer and `basic.get` tasks hand to the connection.
enum Event {
    Deliveries {
        channel: u16,
        consumer_tag: ShortString,
        sub: Arc<LocalSub>,
        deliveries: Vec<v1::Delivery>,
        no_ack: bool,
    },
    Got {
        channel: u16,
        sub: Arc<LocalSub>,
        delivery: Option<v1::Delivery>,
        no_ack: bool,
    },
}

/// A publish being stored, in channel order.
struct Published {
    channel: u16,
    confirm_tag: Option<u64>,
    bytes: u64,
    outcome: Outcome,
}

enum Outcome {
    Stored,
    Failed(BrokerError),
    Unroutable(Box<Content>),
    /// `tx.commit` (true) or `tx.rollback` done, or refused.
    TxSettled(bool, Result<(), BrokerError>),
}

type PublishFuture = Pin<Box<dyn Future<Output = Published> + Send>>;

/// A publish whose header and body are still arriving.
struct Content {
    publish: basic::Publish,
    properties: BasicProperties,
    /// The content header arrived (with the size and properties).
    header: bool,
    size: u64,
    body: Vec<u8>,
}

struct Consumer {
    sub: Arc<LocalSub>,
    window: u32,
    task: AbortHandle,
}

struct Unacked {
    sub: Arc<LocalSub>,
    receipt: String,
}

/// A transactional channel's state (`tx.select`).
#[derive(Default)]
struct Tx {
    /// The qmesh transaction of the publishes since the last commit or rollback (opened at the
    /// first), and those of them still being stored.
    open: Option<(String, Arc<Storing>)>,
    /// Acks (`None`), nacks and rejects since then: carried out at the commit, dropped at a
    /// rollback. (delivery tag, multiple, nack)
    settlements: Vec<(u64, bool, Option<Nack>)>,
}

/// Publishes of one transaction still being stored: its commit waits for them.
#[derive(Default)]
struct Storing {
    count: AtomicUsize,
    done: Notify,
}

impl Storing {
    async fn all_stored(&self) {
        loop {
            let stored = self.done.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            stored.await;
        }
    }

    fn stored(&self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
        self.done.notify_waiters();
    }
}

#[derive(Default)]
struct Channel {
    /// `channel.close` was sent; waiting for `close-ok`.
    closing: bool,
    confirm: bool,
    published: u64,
    prefetch: u16,
    incoming: Option<Content>,
    consumers: HashMap<ShortString, Consumer>,
    /// Every lease holder of this channel (consumers, `basic.get`), released when it closes.
    holders: Vec<(Arc<LocalSub>, Holder)>,
    get_holder: Option<Holder>,
    delivery_tag: u64,
    unacked: BTreeMap<u64, Unacked>,
    flow: Option<watch::Sender<bool>>,
    /// `tx.select` was sent: a transactional channel.
    tx: Option<Tx>,
}

impl Channel {
    fn flow(&mut self) -> watch::Receiver<bool> {
        self.flow
            .get_or_insert_with(|| watch::channel(true).0)
            .subscribe()
    }
}

struct Connection {
    sidecar: Arc<Sidecar>,
    settings: Settings,
    peer: SocketAddr,
    out: OwnedWriteHalf,
    buffer: Vec<u8>,
    frame_max: u32,
    channel_max: u16,
    channels: HashMap<u16, Channel>,
    publishes: FuturesOrdered<PublishFuture>,
    buffered_bytes: u64,
    events: mpsc::Sender<Event>,
    last_write: Instant,
    next_consumer: u64,
}

/// Serves one accepted connection until it ends.
pub async fn run(stream: TcpStream, peer: SocketAddr, sidecar: Arc<Sidecar>, settings: Settings) {
    let (read, write) = stream.into_split();
    let (events, mut event_rx) = mpsc::channel(64);
    let mut conn = Connection {
        sidecar,
        settings,
        peer,
        out: write,
        buffer: Vec::new(),
        frame_max: settings.frame_max,
        channel_max: settings.channel_max,
        channels: HashMap::new(),
        publishes: FuturesOrdered::new(),
        buffered_bytes: 0,
        events,
        last_write: Instant::now(),
        next_consumer: 0,
    };
    let outcome = conn.serve(read, &mut event_rx).await;
    match &outcome {
        Ok(()) => tracing::debug!(%peer, "AMQP connection closed"),
        Err(reason) => tracing::info!(%peer, %reason, "AMQP connection ended"),
    }
    conn.close_all_channels().await;
}

impl Connection {
    async fn serve(
        &mut self,
        mut read: OwnedReadHalf,
        events: &mut mpsc::Receiver<Event>,
    ) -> Result<(), String> {
        // The protocol header: anything else gets ours, then the socket closes (spec 4.2.2).
        let mut header = [0u8; 8];
        match tokio::time::timeout(HANDSHAKE, read.read_exact(&mut header)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("reading the protocol header: {e}")),
            Err(_) => return Err("no protocol header within 10 s".into()),
        }
        if &header != b"AMQP\x00\x00\x09\x01" {
            self.sidecar.metrics.amqp.protocol_errors.inc();
            self.write(&AMQPFrame::ProtocolHeader(ProtocolVersion::amqp_0_9_1()));
            let _ = self.flush().await;
            return Err(format!(
                "not AMQP 0-9-1: the connection began with {header:?}"
            ));
        }
        let frame_limit = Arc::new(AtomicU32::new(self.settings.frame_max));
        let (frames_tx, mut frames) = mpsc::channel(32);
        let reader = self.sidecar.tasks.spawn(
            "amqp reader",
            read_frames(read, Arc::clone(&frame_limit), frames_tx),
        );
        let result = self.session(&mut frames, &frame_limit, events).await;
        reader.abort();
        result
    }

    async fn session(
        &mut self,
        frames: &mut mpsc::Receiver<Result<AMQPFrame, Reply>>,
        frame_limit: &AtomicU32,
        events: &mut mpsc::Receiver<Event>,
    ) -> Result<(), String> {
        let heartbeat = match tokio::time::timeout(HANDSHAKE, self.handshake(frames)).await {
            Ok(Ok(heartbeat)) => heartbeat,
            Ok(Err(fault)) => return self.end(fault, frames).await,
            Err(_) => {
                return self
                    .end(
                        Fault::Connection(Reply::new(
                            reply::CONNECTION_FORCED,
                            "handshake not finished within 10 s",
                        )),
                        frames,
                    )
                    .await;
            }
        };
        frame_limit.store(self.frame_max, Ordering::Relaxed);
        let mut last_read = Instant::now();
        let tick_every = if heartbeat.is_zero() {
            Duration::from_secs(3600)
        } else {
            heartbeat / 2
        };
        let mut tick = tokio::time::interval(tick_every);
        loop {
            let room = self.publishes.len() < PIPELINE && self.buffered_bytes < MAX_BUFFERED_BYTES;
            let step = tokio::select! {
                frame = frames.recv(), if room => match frame {
                    None => Err(Fault::Gone("the client closed the socket".into())),
                    Some(Err(reply)) => Err(Fault::Connection(reply)),
                    Some(Ok(frame)) => {
                        last_read = Instant::now();
                        self.on_frame(frame).await
                    }
                },
                Some(done) = self.publishes.next(), if !self.publishes.is_empty() => {
                    self.on_published(done)
                }
                Some(event) = events.recv() => self.on_event(event).await,
                _ = tick.tick() => {
                    if !heartbeat.is_zero() && last_read.elapsed() > heartbeat * 2 {
                        Err(Fault::Gone(format!("no frame from the client for {:?} (heartbeat {heartbeat:?})", heartbeat * 2)))
                    } else {
                        if !heartbeat.is_zero() && self.last_write.elapsed() >= tick_every {
                            self.write(&AMQPFrame::Heartbeat);
                        }
                        Ok(())
                    }
                }
            };
            match step {
                Ok(()) => {}
                Err(Fault::Channel(id, reply)) => self.close_channel(id, reply).await,
                Err(fault) => return self.end(fault, frames).await,
            }
            if let Err(e) = self.flush().await {
                return Err(format!("writing to the client: {e}"));
            }
        }
    }

    /// Start, tune, open. Returns the heartbeat interval both sides agreed on.
    async fn handshake(
        &mut self,
        frames: &mut mpsc::Receiver<Result<AMQPFrame, Reply>>,
    ) -> Result<Duration, Fault> {
        let mut server_properties = FieldTable::default();
        let mut capabilities = FieldTable::default();
        for name in [
            "publisher_confirms",
            "basic.nack",
            "consumer_cancel_notify",
            "per_consumer_qos",
        ] {
            capabilities.insert(name.into(), AMQPValue::Boolean(true));
        }
        server_properties.insert("product".into(), AMQPValue::LongString("qmesh".into()));
        server_properties.insert(
            "version".into(),
            AMQPValue::LongString(env!("CARGO_PKG_VERSION").into()),
        );
        server_properties.insert(
            "information".into(),
            AMQPValue::LongString(
                "qmesh sidecar: AMQP 0-9-1 onto qmesh Queues and Subscriptions (docs/amqp.md)"
                    .into(),
            ),
        );
        server_properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
        self.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                version_major: 0,
                version_minor: 9,
                server_properties,
                mechanisms: "PLAIN AMQPLAIN".into(),
                locales: "en_US".into(),
            })),
        );
        self.flush().await.map_err(|e| Fault::Gone(e.to_string()))?;

        let start_ok = match next_method(frames).await? {
            AMQPClass::Connection(connection::AMQPMethod::StartOk(ok)) => ok,
            other => return Err(unexpected(&other, "connection.start-ok")),
        };
        let mechanism = start_ok.mechanism.as_str();
        if mechanism != "PLAIN" && mechanism != "AMQPLAIN" {
            return Err(Fault::Connection(Reply::new(
                reply::ACCESS_REFUSED,
                format!(
                    "SASL mechanism {mechanism:?} is not offered: use PLAIN (any credentials are accepted on loopback)"
                ),
            )));
        }
        // Any credentials: the listener is on loopback, in the pod; who may publish and consume is
        // the pod's identity (docs/amqp.md).
        self.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: self.settings.channel_max,
                frame_max: self.settings.frame_max,
                heartbeat: self.settings.heartbeat.as_secs().min(u64::from(u16::MAX)) as u16,
            })),
        );
        self.flush().await.map_err(|e| Fault::Gone(e.to_string()))?;

        let tune_ok = match next_method(frames).await? {
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(ok)) => ok,
            other => return Err(unexpected(&other, "connection.tune-ok")),
        };
        self.frame_max = match tune_ok.frame_max {
            0 => self.settings.frame_max,
            n if n < FRAME_MIN => {
                return Err(Fault::Connection(Reply::new(
                    reply::NOT_ALLOWED,
                    format!("frame-max {n} is below the minimum of {FRAME_MIN}"),
                )));
            }
            n => n.min(self.settings.frame_max),
        };
        self.channel_max = match tune_ok.channel_max {
            0 => self.settings.channel_max,
            n => n.min(self.settings.channel_max),
        };
        let heartbeat = Duration::from_secs(u64::from(tune_ok.heartbeat));

        match next_method(frames).await? {
            AMQPClass::Connection(connection::AMQPMethod::Open(_)) => {}
            other => return Err(unexpected(&other, "connection.open")),
        }
        self.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
        );
        Ok(heartbeat)
    }

    /// Ends the connection: answers a client's close, or sends ours and waits briefly for
    /// `close-ok`.
    async fn end(
        &mut self,
        fault: Fault,
        frames: &mut mpsc::Receiver<Result<AMQPFrame, Reply>>,
    ) -> Result<(), String> {
        match fault {
            Fault::Gone(reason) if reason.is_empty() => Ok(()),
            Fault::Gone(reason) => Err(reason),
            Fault::Channel(..) => unreachable!("channel faults are handled by the session"),
            Fault::Connection(reply) => {
                if reply.code != reply::CONNECTION_FORCED {
                    self.sidecar.metrics.amqp.protocol_errors.inc();
                }
                let text = format!("{} {}", reply.code, reply.text);
                self.method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                        reply_code: reply.code,
                        reply_text: short_text(&reply.text),
                        class_id: reply.class,
                        method_id: reply.method,
                    })),
                );
                if self.flush().await.is_ok() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        while let Some(Ok(frame)) = frames.recv().await {
                            if matches!(
                                frame,
                                AMQPFrame::Method(
                                    0,
                                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))
                                )
                            ) {
                                break;
                            }
                        }
                    })
                    .await;
                }
                Err(text)
            }
        }
    }

    async fn on_frame(&mut self, frame: AMQPFrame) -> Result<(), Fault> {
        match frame {
            AMQPFrame::Heartbeat => Ok(()),
            AMQPFrame::ProtocolHeader(_) | AMQPFrame::InvalidHeartbeat(_) => Err(
                Fault::Connection(Reply::new(reply::FRAME_ERROR, "unexpected frame type")),
            ),
            AMQPFrame::Method(0, method) => self.on_connection_method(method).await,
            AMQPFrame::Method(id, method) => self.on_channel_method(id, method).await,
            AMQPFrame::Header(id, header) => self.on_header(id, header),
            AMQPFrame::Body(id, bytes) => self.on_body(id, bytes),
        }
    }

    async fn on_connection_method(&mut self, method: AMQPClass) -> Result<(), Fault> {
        match method {
            AMQPClass::Connection(connection::AMQPMethod::Close(close)) => {
                tracing::debug!(peer = %self.peer, code = close.reply_code, text = %close.reply_text, "client closed the AMQP connection");
                self.close_all_channels().await;
                self.method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                let _ = self.flush().await;
                Err(Fault::Gone(String::new()))
            }
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => {
                Err(Fault::Gone(String::new()))
            }
            AMQPClass::Connection(
                connection::AMQPMethod::Blocked(_) | connection::AMQPMethod::Unblocked(_),
            ) => Ok(()),
            AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(_)) => Err(
                Fault::Connection(not_implemented(&method, "connection.update-secret", "")),
            ),
            other => Err(Fault::Connection(
                Reply::new(
                    reply::COMMAND_INVALID,
                    "this method is not valid on channel 0",
                )
                .about(&other),
            )),
        }
    }

    async fn on_channel_method(&mut self, id: u16, method: AMQPClass) -> Result<(), Fault> {
        if let AMQPClass::Channel(channel::AMQPMethod::Open(_)) = method {
            if self.channels.contains_key(&id) {
                return Err(Fault::Connection(
                    Reply::new(
                        reply::CHANNEL_ERROR,
                        format!("channel {id} is open already"),
                    )
                    .about(&method),
                ));
            }
            if id > self.channel_max {
                return Err(Fault::Connection(
                    Reply::new(
                        reply::CHANNEL_ERROR,
                        format!("channel {id} is above channel-max {}", self.channel_max),
                    )
                    .about(&method),
                ));
            }
            self.channels.insert(id, Channel::default());
            self.method(
                id,
                AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
            );
            return Ok(());
        }
        let Some(ch) = self.channels.get_mut(&id) else {
            return Err(Fault::Connection(
                Reply::new(reply::CHANNEL_ERROR, format!("channel {id} is not open"))
                    .about(&method),
            ));
        };
        if ch.closing {
            // Waiting for close-ok: everything else is dropped (spec 4.2.6); a crossing close is
            // answered.
            match method {
                AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                    self.channels.remove(&id);
                }
                AMQPClass::Channel(channel::AMQPMethod::Close(_)) => self.method(
                    id,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                ),
                _ => {}
            }
            return Ok(());
        }
        if ch.incoming.is_some() {
            return Err(Fault::Connection(
                Reply::new(
                    reply::UNEXPECTED_FRAME,
                    format!(
                        "channel {id}: a method arrived while a publish's content was expected"
                    ),
                )
                .about(&method),
            ));
        }
        let reply = |class: AMQPClass| Some(class);
        let answer: Option<AMQPClass> = match &method {
            AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                self.release_channel(id).await;
                self.channels.remove(&id);
                reply(AMQPClass::Channel(channel::AMQPMethod::CloseOk(
                    channel::CloseOk {},
                )))
            }
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => None,
            AMQPClass::Channel(channel::AMQPMethod::Flow(flow)) => {
                if let Some(tx) = &ch.flow {
                    tx.send_replace(flow.active);
                } else {
                    ch.flow = Some(watch::channel(flow.active).0);
                }
                reply(AMQPClass::Channel(channel::AMQPMethod::FlowOk(
                    channel::FlowOk {
                        active: flow.active,
                    },
                )))
            }
            AMQPClass::Channel(channel::AMQPMethod::FlowOk(_)) => None,
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(declare)) => {
                let name = declare.exchange.as_str();
                if !(name.is_empty() || name.starts_with("amq.")) {
                    return Err(Fault::Channel(
                        id,
                        if declare.passive {
                            Reply::new(
                                reply::NOT_FOUND,
                                format!("no exchange {name:?}: qmesh has the default exchange only (routing key = queue name)"),
                            )
                        } else {
                            Reply::new(
                                reply::NOT_IMPLEMENTED,
                                format!("exchange {name:?}: named exchanges and bindings are not supported by qmesh; publish to the default exchange \"\" with the queue's name as the routing key"),
                            )
                        }
                        .about(&method),
                    ));
                }
                (!declare.nowait).then_some(AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(
                    exchange::DeclareOk {},
                )))
            }
            AMQPClass::Queue(queue::AMQPMethod::Declare(declare)) => {
                let name = declare.queue.as_str();
                let backlog = self
                    .queue_backlog(name)
                    .map_err(|reply| Fault::Channel(id, reply.about(&method)))?;
                (!declare.nowait).then(|| {
                    AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                        queue: declare.queue.clone(),
                        message_count: backlog,
                        consumer_count: 0,
                    }))
                })
            }
            AMQPClass::Basic(basic::AMQPMethod::Qos(qos)) => {
                ch.prefetch = qos.prefetch_count;
                reply(AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})))
            }
            AMQPClass::Basic(basic::AMQPMethod::Consume(consume)) => {
                let consume = consume.clone();
                self.consume(id, consume)
                    .map_err(|reply| Fault::Channel(id, reply.about(&method)))?
            }
            AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)) => {
                if let Some(consumer) = ch.consumers.remove(&cancel.consumer_tag) {
                    consumer.task.abort();
                    let consumers = Arc::clone(&self.sidecar.consumers);
                    consumers
                        .app_left(&consumer.sub, Some(consumer.window))
                        .await;
                }
                (!cancel.nowait).then(|| {
                    AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                        consumer_tag: cancel.consumer_tag.clone(),
                    }))
                })
            }
            AMQPClass::Basic(basic::AMQPMethod::Publish(publish)) => {
                if publish.immediate {
                    return Err(Fault::Channel(
                        id,
                        not_implemented(
                            &method,
                            "basic.publish with immediate=true",
                            " (nor by RabbitMQ 3)",
                        ),
                    ));
                }
                ch.incoming = Some(Content {
                    publish: publish.clone(),
                    properties: BasicProperties::default(),
                    header: false,
                    size: 0,
                    body: Vec::new(),
                });
                None
            }
            AMQPClass::Basic(basic::AMQPMethod::Get(get)) => {
                let get = get.clone();
                self.get(id, get)
                    .map_err(|reply| Fault::Channel(id, reply.about(&method)))?;
                None
            }
            AMQPClass::Basic(
                basic::AMQPMethod::Ack(_)
                | basic::AMQPMethod::Nack(_)
                | basic::AMQPMethod::Reject(_),
            ) => {
                let (tag, multiple, nack) = match &method {
                    AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => {
                        (a.delivery_tag, a.multiple, None)
                    }
                    AMQPClass::Basic(basic::AMQPMethod::Nack(n)) => {
                        (n.delivery_tag, n.multiple, Some(rejected(n.requeue)))
                    }
                    AMQPClass::Basic(basic::AMQPMethod::Reject(r)) => {
                        (r.delivery_tag, false, Some(rejected(r.requeue)))
                    }
                    _ => unreachable!("matched above"),
                };
                if let Some(tx) = ch.tx.as_mut() {
                    // Carried out at the commit: the tag must be one this channel holds now.
                    if !multiple && !ch.unacked.contains_key(&tag) {
                        return Err(Fault::Channel(
                            id,
                            Reply::new(
                                reply::PRECONDITION_FAILED,
                                format!("unknown delivery tag {tag}"),
                            )
                            .about(&method),
                        ));
                    }
                    tx.settlements.push((tag, multiple, nack));
                    return Ok(());
                }
                self.settle(id, tag, multiple, nack)
                    .await
                    .map_err(|reply| Fault::Channel(id, reply.about(&method)))?;
                None
            }
            AMQPClass::Tx(tx::AMQPMethod::Select(_)) => {
                if ch.confirm {
                    return Err(Fault::Channel(
                        id,
                        Reply::new(
                            reply::PRECONDITION_FAILED,
                            "a channel in confirm mode cannot be made transactional",
                        )
                        .about(&method),
                    ));
                }
                ch.tx.get_or_insert_with(Tx::default);
                reply(AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})))
            }
            AMQPClass::Tx(tx::AMQPMethod::Commit(_) | tx::AMQPMethod::Rollback(_)) => {
                let commit = matches!(method, AMQPClass::Tx(tx::AMQPMethod::Commit(_)));
                let Some(tx) = ch.tx.as_mut() else {
                    return Err(Fault::Channel(
                        id,
                        Reply::new(
                            reply::PRECONDITION_FAILED,
                            "channel is not transactional: send tx.select first",
                        )
                        .about(&method),
                    ));
                };
                let settlements = std::mem::take(&mut tx.settlements);
                let open = tx.open.take();
                if commit {
                    for (tag, multiple, nack) in settlements {
                        // A tag settled twice in one transaction was settled by the first.
                        if !multiple && !self.channels[&id].unacked.contains_key(&tag) {
                            continue;
                        }
                        self.settle(id, tag, multiple, nack)
                            .await
                            .map_err(|reply| Fault::Channel(id, reply.about(&method)))?;
                    }
                }
                let owner = Arc::clone(&self.sidecar.owner);
                // In the publish pipeline, so the answer follows the publishes' outcomes.
                self.publishes.push_back(
                    async move {
                        let result = match open {
                            None => Ok(()),
                            Some((transaction, storing)) => {
                                storing.all_stored().await;
                                let decision = if commit {
                                    Decision::Commit
                                } else {
                                    Decision::Rollback
                                };
                                owner
                                    .settle_transaction(&transaction, decision)
                                    .await
                                    .map(|_| ())
                            }
                        };
                        Published {
                            channel: id,
                            confirm_tag: None,
                            bytes: 0,
                            outcome: Outcome::TxSettled(commit, result),
                        }
                    }
                    .boxed(),
                );
                None
            }
            AMQPClass::Confirm(confirm::AMQPMethod::Select(select)) => {
                if ch.tx.is_some() {
                    return Err(Fault::Channel(
                        id,
                        Reply::new(
                            reply::PRECONDITION_FAILED,
                            "a transactional channel cannot be put in confirm mode",
                        )
                        .about(&method),
                    ));
                }
                ch.confirm = true;
                (!select.nowait).then_some(AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(
                    confirm::SelectOk {},
                )))
            }
            other => {
                if let Some((name, hint)) = unsupported(other) {
                    return Err(Fault::Channel(id, not_implemented(other, name, hint)));
                }
                return Err(Fault::Connection(
                    Reply::new(reply::COMMAND_INVALID, "a client may not send this method")
                        .about(other),
                ));
            }
        };
        if let Some(answer) = answer {
            self.method(id, answer);
        }
        Ok(())
    }

    /// The backlog this sidecar holds for a queue of the namespace, or 404 naming what to do.
    fn queue_backlog(&self, name: &str) -> Result<u32, Reply> {
        if name.is_empty() {
            return Err(Reply::new(
                reply::NOT_IMPLEMENTED,
                "server-named queues are not supported by qmesh: declare a queue by its name, after \
                 creating it as a Queue resource",
            ));
        }
        let exists = {
            let view = self.sidecar.view.borrow();
            view.queue(name).is_some()
                || view.is_foreign_queue(name)
                || view.subscriptions().iter().any(|s| s.queue == name)
        };
        if !exists {
            return Err(Reply::new(
                reply::NOT_FOUND,
                format!(
                    "no queue {name:?} in this pod's namespace: qmesh queues are Queue resources — \
                     kubectl apply a Queue named {name:?} (queue.declare never creates one)"
                ),
            ));
        }
        let backlog = self
            .sidecar
            .owner
            .stats()
            .into_iter()
            .filter(|q| q.queue == name)
            .flat_map(|q| q.subscriptions.into_iter().map(|s| s.backlog))
            .max()
            .unwrap_or(0);
        Ok(backlog.min(u64::from(u32::MAX)) as u32)
    }

    /// The Subscription of `queue` that serves this pod (the `x-qmesh-subscription` argument picks
    /// one when several do).
    fn served(&self, queue: &str, arguments: &FieldTable) -> Result<Arc<LocalSub>, Reply> {
        let wanted = arguments
            .inner()
            .get(SUBSCRIPTION_ARGUMENT)
            .map(|v| match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                _ => String::new(),
            });
        let names: Vec<String> = {
            let view = self.sidecar.view.borrow();
            view.subscriptions()
                .iter()
                .filter(|s| s.queue == queue)
                .map(|s| s.name.clone())
                .collect()
        };
        let name = match (wanted, names.as_slice()) {
            (Some(w), _) if names.contains(&w) => w,
            (Some(w), _) => {
                return Err(Reply::new(
                    reply::NOT_FOUND,
                    format!(
                        "{SUBSCRIPTION_ARGUMENT}={w:?}: no Subscription of that name on queue {queue:?} serves this pod (it has: {names:?})"
                    ),
                ));
            }
            (None, [one]) => one.clone(),
            (None, []) => {
                self.queue_backlog(queue)?;
                return Err(Reply::new(
                    reply::NOT_FOUND,
                    format!(
                        "no Subscription of queue {queue:?} selects this pod as a consumer: kubectl \
                         apply a Subscription of {queue:?} whose consumers match this pod"
                    ),
                ));
            }
            (None, many) => {
                return Err(Reply::new(
                    reply::PRECONDITION_FAILED,
                    format!(
                        "queue {queue:?} has {} Subscriptions serving this pod ({many:?}): pass the consume argument {SUBSCRIPTION_ARGUMENT} to choose one",
                        many.len()
                    ),
                ));
            }
        };
        self.sidecar
            .consumers
            .subscription(&name)
            .map_err(|e| Reply::new(reply::NOT_FOUND, e.to_string()))
    }

    fn consume(&mut self, id: u16, consume: basic::Consume) -> Result<Option<AMQPClass>, Reply> {
        let sub = self.served(consume.queue.as_str(), &consume.arguments)?;
        self.next_consumer += 1;
        let tag = if consume.consumer_tag.as_str().is_empty() {
            ShortString::from(format!("amq.ctag-qmesh-{}", self.next_consumer))
        } else {
            consume.consumer_tag.clone()
        };
        let consumers = Arc::clone(&self.sidecar.consumers);
        let events = self.events.clone();
        let ch = self.channels.get_mut(&id).expect("the channel is open");
        if ch.consumers.contains_key(&tag) {
            return Err(Reply::new(
                reply::NOT_ALLOWED,
                format!("consumer tag {:?} is in use on this channel", tag.as_str()),
            ));
        }
        let max = sub.settings().max_in_flight.clamp(1, MAX_WINDOW);
        let window = match ch.prefetch {
            0 => max,
            n => u32::from(n).min(max),
        };
        let holder = consumers.new_holder();
        ch.holders.push((Arc::clone(&sub), holder));
        consumers.app_joined(&sub, Some(window));
        let flow = ch.flow();
        let task = self.sidecar.tasks.spawn(
            "amqp consumer",
            deliver(Feed {
                consumers,
                sub: Arc::clone(&sub),
                holder,
                window,
                events,
                channel: id,
                tag: tag.clone(),
                no_ack: consume.no_ack,
                flow,
            }),
        );
        ch.consumers
            .insert(tag.clone(), Consumer { sub, window, task });
        Ok(
            (!consume.nowait).then_some(AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(
                basic::ConsumeOk { consumer_tag: tag },
            ))),
        )
    }

    fn get(&mut self, id: u16, get: basic::Get) -> Result<(), Reply> {
        let sub = self.served(get.queue.as_str(), &FieldTable::default())?;
        let consumers = Arc::clone(&self.sidecar.consumers);
        let events = self.events.clone();
        let ch = self.channels.get_mut(&id).expect("the channel is open");
        let holder = match ch.get_holder {
            Some(h) => h,
            None => {
                let h = consumers.new_holder();
                ch.get_holder = Some(h);
                h
            }
        };
        if !ch
            .holders
            .iter()
            .any(|(s, h)| *h == holder && s.name() == sub.name())
        {
            ch.holders.push((Arc::clone(&sub), holder));
        }
        self.sidecar.tasks.spawn("amqp basic.get", async move {
            consumers.polled(&sub);
            let mut taken = consumers.take(&sub, 1, GET_WAIT, holder).await;
            let delivery = taken.pop();
            let _ = events
                .send(Event::Got {
                    channel: id,
                    sub,
                    delivery,
                    no_ack: get.no_ack,
                })
                .await;
        });
        Ok(())
    }

    async fn settle(
        &mut self,
        id: u16,
        tag: u64,
        multiple: bool,
        nack: Option<Nack>,
    ) -> Result<(), Reply> {
        let ch = self.channels.get_mut(&id).expect("the channel is open");
        let settled: Vec<Unacked> = if multiple {
            let upto = if tag == 0 { u64::MAX } else { tag };
            let tags: Vec<u64> = ch.unacked.range(..=upto).map(|(t, _)| *t).collect();
            tags.iter().filter_map(|t| ch.unacked.remove(t)).collect()
        } else {
            match ch.unacked.remove(&tag) {
                Some(u) => vec![u],
                None => {
                    return Err(Reply::new(
                        reply::PRECONDITION_FAILED,
                        format!("unknown delivery tag {tag}"),
                    ));
                }
            }
        };
        let mut by_sub: HashMap<String, (Arc<LocalSub>, Vec<String>)> = HashMap::new();
        for u in settled {
            by_sub
                .entry(u.sub.name().to_owned())
                .or_insert_with(|| (Arc::clone(&u.sub), Vec::new()))
                .1
                .push(u.receipt);
        }
        for (sub, receipts) in by_sub.into_values() {
            self.sidecar
                .consumers
                .settle(&sub, &receipts, nack.clone())
                .await;
        }
        Ok(())
    }

    fn on_header(&mut self, id: u16, header: AMQPContentHeader) -> Result<(), Fault> {
        let ch = self.channels.get_mut(&id);
        let Some(ch) = ch else {
            return Err(Fault::Connection(Reply::new(
                reply::CHANNEL_ERROR,
                format!("content header on channel {id}, which is not open"),
            )));
        };
        if ch.closing {
            return Ok(());
        }
        let Some(content) = ch.incoming.as_mut().filter(|c| !c.header) else {
            return Err(Fault::Connection(Reply::new(
                reply::UNEXPECTED_FRAME,
                format!("channel {id}: a content header without basic.publish before it"),
            )));
        };
        let queue = content.publish.routing_key.as_str().to_owned();
        let limit = {
            let view = self.sidecar.view.borrow();
            view.queue(&queue)
                .and_then(|q| q.policy.as_ref())
                .map(|p| p.max_message_bytes)
                .filter(|&l| l > 0)
                .unwrap_or(crate::frames::CEILING as u64)
        };
        if header.body_size > limit {
            ch.incoming = None;
            return Err(Fault::Channel(
                id,
                Reply {
                    code: reply::PRECONDITION_FAILED,
                    text: format!(
                        "message of {} bytes exceeds queue {queue:?}'s maxMessageBytes of {limit}",
                        header.body_size
                    ),
                    class: 60,
                    method: 40,
                },
            ));
        }
        if self.buffered_bytes + header.body_size > MAX_BUFFERED_BYTES {
            return Err(Fault::Connection(Reply::new(
                reply::RESOURCE_ERROR,
                format!("this connection buffers more than {MAX_BUFFERED_BYTES} bytes of messages"),
            )));
        }
        self.buffered_bytes += header.body_size;
        content.properties = header.properties;
        content.header = true;
        content.size = header.body_size;
        content.body.reserve(header.body_size.min(1 << 20) as usize);
        if header.body_size == 0 {
            return self.published(id);
        }
        Ok(())
    }

    fn on_body(&mut self, id: u16, bytes: Vec<u8>) -> Result<(), Fault> {
        let Some(ch) = self.channels.get_mut(&id) else {
            return Err(Fault::Connection(Reply::new(
                reply::CHANNEL_ERROR,
                format!("content body on channel {id}, which is not open"),
            )));
        };
        if ch.closing {
            return Ok(());
        }
        let Some(content) = ch.incoming.as_mut().filter(|c| c.header) else {
            return Err(Fault::Connection(Reply::new(
                reply::UNEXPECTED_FRAME,
                format!("channel {id}: a content body without a header before it"),
            )));
        };
        content.body.extend_from_slice(&bytes);
        let received = content.body.len() as u64;
        if received > content.size {
            return Err(Fault::Connection(Reply::new(
                reply::FRAME_ERROR,
                format!(
                    "channel {id}: {received} body bytes where the header announced {}",
                    content.size
                ),
            )));
        }
        if received == content.size {
            return self.published(id);
        }
        Ok(())
    }

    /// A publish whose content is complete: routed and stored, its outcome in the pipeline.
    fn published(&mut self, id: u16) -> Result<(), Fault> {
        let ch = self.channels.get_mut(&id).expect("the channel is open");
        let content = ch.incoming.take().expect("content is being received");
        let confirm_tag = ch.confirm.then(|| {
            ch.published += 1;
            ch.published
        });
        let bytes = content.size;
        let exchange = content.publish.exchange.as_str();
        let queue = content.publish.routing_key.as_str().to_owned();
        let routable = match exchange {
            "" | "amq.default" => {
                let view = self.sidecar.view.borrow();
                view.queue(&queue).is_some() || view.is_foreign_queue(&queue)
            }
            e if e.starts_with("amq.") => false,
            e => {
                self.buffered_bytes = self.buffered_bytes.saturating_sub(bytes);
                return Err(Fault::Channel(
                    id,
                    Reply {
                        code: reply::NOT_FOUND,
                        text: format!(
                            "no exchange {e:?}: qmesh has the default exchange \"\" only (routing key = queue name)"
                        ),
                        class: 60,
                        method: 40,
                    },
                ));
            }
        };
        if !routable {
            self.sidecar.metrics.amqp.unroutable.inc();
            tracing::debug!(%queue, exchange, "AMQP publish to no queue: unroutable");
            self.publishes.push_back(
                futures::future::ready(Published {
                    channel: id,
                    confirm_tag,
                    bytes,
                    outcome: Outcome::Unroutable(Box::new(content)),
                })
                .boxed(),
            );
            return Ok(());
        }
        let schedule = match message::delay(&content.properties) {
            Ok(None) => Schedule::Now,
            Ok(Some(delay)) => Schedule::After(delay, "x-delay"),
            Err(text) => {
                self.buffered_bytes = self.buffered_bytes.saturating_sub(bytes);
                return Err(Fault::Channel(
                    id,
                    Reply {
                        code: reply::PRECONDITION_FAILED,
                        text,
                        class: 60,
                        method: 40,
                    },
                ));
            }
        };
        let message = match message::to_message(&content.properties, content.body) {
            Ok(m) => m,
            Err(text) => {
                self.buffered_bytes = self.buffered_bytes.saturating_sub(bytes);
                return Err(Fault::Channel(
                    id,
                    Reply {
                        code: reply::PRECONDITION_FAILED,
                        text,
                        class: 60,
                        method: 40,
                    },
                ));
            }
        };
        // A transactional channel's publishes go into its open qmesh transaction.
        let ch = self.channels.get_mut(&id).expect("the channel is open");
        let in_tx = match ch.tx.as_mut() {
            None => None,
            Some(tx) => {
                if tx.open.is_none() {
                    let opened = self.sidecar.owner.begin_transaction().map_err(|error| {
                        self.buffered_bytes = self.buffered_bytes.saturating_sub(bytes);
                        Fault::Channel(
                            id,
                            Reply {
                                code: reply_code(&error),
                                text: error.to_string(),
                                class: 60,
                                method: 40,
                            },
                        )
                    })?;
                    tx.open = Some((opened.transaction, Arc::default()));
                }
                let (transaction, storing) = tx.open.clone().expect("opened above");
                storing.count.fetch_add(1, Ordering::SeqCst);
                Some((transaction, storing))
            }
        };
        let sidecar = Arc::clone(&self.sidecar);
        self.publishes.push_back(
            async move {
                let transaction = in_tx.as_ref().map_or("", |(t, _)| t.as_str());
                let outcome = match sidecar
                    .publish_scheduled(&queue, message, schedule, transaction)
                    .await
                {
                    Ok(_) => Outcome::Stored,
                    Err(e) => Outcome::Failed(e),
                };
                if let Some((_, storing)) = &in_tx {
                    storing.stored();
                }
                Published {
                    channel: id,
                    confirm_tag,
                    bytes,
                    outcome,
                }
            }
            .boxed(),
        );
        Ok(())
    }

    fn on_published(&mut self, done: Published) -> Result<(), Fault> {
        self.buffered_bytes = self.buffered_bytes.saturating_sub(done.bytes);
        let id = done.channel;
        if self.channels.get(&id).is_none_or(|c| c.closing) {
            if let Outcome::Failed(error) = &done.outcome {
                tracing::warn!(channel = id, %error, "AMQP publish failed after its channel closed");
            }
            return Ok(());
        }
        match done.outcome {
            Outcome::Stored => {}
            Outcome::TxSettled(commit, Ok(())) => {
                self.method(
                    id,
                    if commit {
                        AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {}))
                    } else {
                        AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {}))
                    },
                );
            }
            Outcome::TxSettled(commit, Err(error)) => {
                return Err(Fault::Channel(
                    id,
                    Reply {
                        code: reply_code(&error),
                        text: error.to_string(),
                        class: 90,
                        method: if commit { 20 } else { 30 },
                    },
                ));
            }
            Outcome::Unroutable(content) => {
                if content.publish.mandatory {
                    self.method(
                        id,
                        AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                            reply_code: reply::NO_ROUTE,
                            reply_text: short_text(&format!(
                                "NO_ROUTE: no queue {:?} in this pod's namespace",
                                content.publish.routing_key.as_str()
                            )),
                            exchange: content.publish.exchange.clone(),
                            routing_key: content.publish.routing_key.clone(),
                        })),
                    );
                    self.content(id, content.properties, &content.body);
                }
            }
            Outcome::Failed(error) => match done.confirm_tag {
                Some(tag) => {
                    tracing::warn!(channel = id, tag, %error, "AMQP publish refused: basic.nack");
                    self.method(
                        id,
                        AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                            delivery_tag: tag,
                            multiple: false,
                            requeue: false,
                        })),
                    );
                    return Ok(());
                }
                None => {
                    return Err(Fault::Channel(
                        id,
                        Reply {
                            code: reply_code(&error),
                            text: error.to_string(),
                            class: 60,
                            method: 40,
                        },
                    ));
                }
            },
        }
        if let Some(tag) = done.confirm_tag {
            self.method(
                id,
                AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: tag,
                    multiple: false,
                })),
            );
        }
        Ok(())
    }

    async fn on_event(&mut self, event: Event) -> Result<(), Fault> {
        match event {
            Event::Deliveries {
                channel: id,
                consumer_tag,
                sub,
                deliveries,
                no_ack,
            } => {
                // A channel that closed meanwhile released these leases already.
                if self.channels.get(&id).is_none_or(|c| c.closing) {
                    return Ok(());
                }
                let queue = ShortString::try_new(sub.settings().queue).unwrap_or_default();
                let mut receipts = Vec::new();
                for delivery in deliveries {
                    let tag = self.next_tag(id);
                    let Some(message) = delivery.message else {
                        continue;
                    };
                    self.method(
                        id,
                        AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                            consumer_tag: consumer_tag.clone(),
                            delivery_tag: tag,
                            redelivered: delivery.attempt > 1,
                            exchange: ShortString::default(),
                            routing_key: queue.clone(),
                        })),
                    );
                    self.content(id, message::properties(&message), &message.payload);
                    self.track(id, tag, &sub, delivery.receipt, no_ack, &mut receipts);
                }
                if !receipts.is_empty() {
                    self.sidecar.consumers.settle(&sub, &receipts, None).await;
                }
            }
            Event::Got {
                channel: id,
                sub,
                delivery,
                no_ack,
            } => {
                let open = self.channels.get(&id).is_some_and(|c| !c.closing);
                match (open, delivery) {
                    (false, _) => {}
                    (true, None) => self.method(
                        id,
                        AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
                    ),
                    (true, Some(delivery)) => {
                        let tag = self.next_tag(id);
                        let message = delivery.message.unwrap_or_default();
                        self.method(
                            id,
                            AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                                delivery_tag: tag,
                                redelivered: delivery.attempt > 1,
                                exchange: ShortString::default(),
                                routing_key: ShortString::try_new(sub.settings().queue)
                                    .unwrap_or_default(),
                                message_count: 0,
                            })),
                        );
                        self.content(id, message::properties(&message), &message.payload);
                        let mut receipts = Vec::new();
                        self.track(id, tag, &sub, delivery.receipt, no_ack, &mut receipts);
                        if !receipts.is_empty() {
                            self.sidecar.consumers.settle(&sub, &receipts, None).await;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn next_tag(&mut self, id: u16) -> u64 {
        let ch = self.channels.get_mut(&id).expect("the channel is open");
        ch.delivery_tag += 1;
        ch.delivery_tag
    }

    /// Remembers a delivery until it is acked, or collects its receipt to ack now (`no-ack`).
    fn track(
        &mut self,
        id: u16,
        tag: u64,
        sub: &Arc<LocalSub>,
        receipt: String,
        no_ack: bool,
        receipts: &mut Vec<String>,
    ) {
        if no_ack {
            receipts.push(receipt);
        } else if let Some(ch) = self.channels.get_mut(&id) {
            ch.unacked.insert(
                tag,
                Unacked {
                    sub: Arc::clone(sub),
                    receipt,
                },
            );
        }
    }

    /// Sends `channel.close` and gives back what the channel held; the channel stays until the
    /// client's `close-ok`.
    async fn close_channel(&mut self, id: u16, reply: Reply) {
        tracing::info!(peer = %self.peer, channel = id, code = reply.code, text = %reply.text, "closing an AMQP channel");
        self.release_channel(id).await;
        if let Some(ch) = self.channels.get_mut(&id) {
            ch.closing = true;
            ch.incoming = None;
        }
        self.method(
            id,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: reply.code,
                reply_text: short_text(&reply.text),
                class_id: reply.class,
                method_id: reply.method,
            })),
        );
    }

    /// Stops the channel's consumers and returns its unacked deliveries to their owners.
    async fn release_channel(&mut self, id: u16) {
        let Some(ch) = self.channels.get_mut(&id) else {
            return;
        };
        let consumers: Vec<Consumer> = ch.consumers.drain().map(|(_, c)| c).collect();
        let holders = std::mem::take(&mut ch.holders);
        ch.unacked.clear();
        if let Some((transaction, storing)) = ch.tx.as_mut().and_then(|tx| tx.open.take()) {
            // A channel closed with its transaction open rolls it back (as in RabbitMQ).
            let owner = Arc::clone(&self.sidecar.owner);
            self.sidecar.tasks.spawn("AMQP transaction rollback", async move {
                storing.all_stored().await;
                if let Err(error) = owner
                    .settle_transaction(&transaction, Decision::Rollback)
                    .await
                {
                    tracing::debug!(%transaction, %error, "an AMQP channel's transaction at its close");
                }
            });
        }
        if let Some(content) = ch.incoming.take() {
            self.buffered_bytes = self.buffered_bytes.saturating_sub(content.size);
        }
        let broker = Arc::clone(&self.sidecar.consumers);
        for consumer in consumers {
            consumer.task.abort();
            broker.app_left(&consumer.sub, Some(consumer.window)).await;
        }
        release(&broker, holders).await;
    }

    async fn close_all_channels(&mut self) {
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for id in ids {
            self.release_channel(id).await;
        }
        self.channels.clear();
    }

    fn method(&mut self, channel: u16, method: AMQPClass) {
        self.write(&AMQPFrame::Method(channel, method));
    }

    /// A content header and its body, cut to `frame-max`.
    fn content(&mut self, channel: u16, properties: BasicProperties, body: &[u8]) {
        self.write(&AMQPFrame::Header(
            channel,
            AMQPContentHeader {
                class_id: 60,
                body_size: body.len() as u64,
                properties,
            },
        ));
        let chunk = (self.frame_max as usize).saturating_sub(8).max(1);
        for part in body.chunks(chunk) {
            self.write(&AMQPFrame::Body(channel, part.to_vec()));
        }
    }

    fn write(&mut self, frame: &AMQPFrame) {
        let buffer = std::mem::take(&mut self.buffer);
        match gen_frame(frame)(WriteContext::from(buffer)) {
            Ok(ctx) => self.buffer = ctx.into_inner().0,
            Err(error) => {
                // Only a value too large for its field can fail here; nothing of it was sent.
                tracing::error!(%error, %frame, "could not encode an AMQP frame");
            }
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let result = self.out.write_all(&self.buffer).await;
        self.buffer.clear();
        self.last_write = Instant::now();
        result
    }
}

async fn release(consumers: &Consumers, holders: Vec<(Arc<LocalSub>, Holder)>) {
    for (sub, holder) in holders {
        consumers
            .release_holder(&sub, holder, "AMQP channel closed before the ack")
            .await;
    }
}

/// `nack`/`reject`: requeue = retry with the Subscription's backoff; no requeue = dead letter now.
fn rejected(requeue: bool) -> Nack {
    if requeue {
        Nack::retry(None, "nacked by an AMQP consumer (requeue)")
    } else {
        Nack {
            delay: None,
            reason: "rejected by an AMQP consumer (requeue=false)".into(),
            dead_letter: true,
        }
    }
}

fn reply_code(error: &BrokerError) -> u16 {
    match error {
        BrokerError::UnknownQueue(_) | BrokerError::UnknownSubscription(_) => reply::NOT_FOUND,
        BrokerError::NotPublisher(_) => reply::ACCESS_REFUSED,
        BrokerError::TooLarge { .. } | BrokerError::Invalid(_) => reply::PRECONDITION_FAILED,
        BrokerError::Internal(_) => reply::INTERNAL_ERROR,
        _ => reply::RESOURCE_ERROR,
    }
}

fn short_text(text: &str) -> ShortString {
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::try_new(text[..end].to_owned()).unwrap_or_default()
}

fn unexpected(method: &AMQPClass, wanted: &str) -> Fault {
    Fault::Connection(
        Reply::new(
            reply::COMMAND_INVALID,
            format!("expected {wanted} during the handshake"),
        )
        .about(method),
    )
}

async fn next_method(
    frames: &mut mpsc::Receiver<Result<AMQPFrame, Reply>>,
) -> Result<AMQPClass, Fault> {
    loop {
        match frames.recv().await {
            None => return Err(Fault::Gone("the client left during the handshake".into())),
            Some(Err(reply)) => return Err(Fault::Connection(reply)),
            Some(Ok(AMQPFrame::Heartbeat)) => continue,
            Some(Ok(AMQPFrame::Method(0, method))) => return Ok(method),
            Some(Ok(_)) => {
                return Err(Fault::Connection(Reply::new(
                    reply::UNEXPECTED_FRAME,
                    "only connection methods on channel 0 are valid during the handshake",
                )));
            }
        }
    }
}

/// What a consumer task needs.
struct Feed {
    consumers: Arc<Consumers>,
    sub: Arc<LocalSub>,
    holder: Holder,
    window: u32,
    events: mpsc::Sender<Event>,
    channel: u16,
    tag: ShortString,
    no_ack: bool,
    flow: watch::Receiver<bool>,
}

/// One `basic.consume`: takes deliveries while the consumer holds fewer than its prefetch window
/// unacked, and hands them to the connection.
async fn deliver(mut feed: Feed) {
    loop {
        if feed.flow.wait_for(|active| *active).await.is_err() {
            return;
        }
        let credit = (feed.window as usize).saturating_sub(feed.sub.held_by(feed.holder));
        if credit == 0 {
            let _ =
                tokio::time::timeout(Duration::from_millis(500), feed.sub.lease_released()).await;
            continue;
        }
        let deliveries = tokio::select! {
            d = feed.consumers.take(&feed.sub, credit.min(256), Duration::from_secs(3600), feed.holder) => d,
            _ = feed.flow.changed() => continue,
        };
        if deliveries.is_empty() {
            continue;
        }
        let event = Event::Deliveries {
            channel: feed.channel,
            consumer_tag: feed.tag.clone(),
            sub: Arc::clone(&feed.sub),
            deliveries,
            no_ack: feed.no_ack,
        };
        if feed.events.send(event).await.is_err() {
            return;
        }
    }
}
