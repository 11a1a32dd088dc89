//! Admission webhooks, served over HTTPS on every replica:
//!
//! ```text
//!   API server ──POST /inject   (Pods, CREATE)──────────────▶ inject() ──▶ JSON patch adding the sidecar
//!              ──POST /validate (Queues, Subscriptions)──────▶ validate() / validate_update() ──▶ allow | deny
//! ```
//! TLS comes from [`tls::Manager`] (own CA, rotated, caBundle patched) or, with cert-manager, from
//! files that are re-read when they change.

pub mod inject;
pub mod tls;

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use axum::{Json, Router, extract::State, routing::post};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Client,
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    },
};
use qmesh_api::{Queue, Subscription, Validate};
use tokio::net::TcpListener;

pub use inject::{SidecarTemplate, Skip, inject};

use crate::{
    config::WebhookConfig,
    metrics::{WebhookResult, webhook_answered},
};

struct AppState {
    template: SidecarTemplate,
    events: Option<Client>,
    /// The mesh CA's bundle as it changes; injected instead of the template's when given.
    bundle: Option<tokio::sync::watch::Receiver<String>>,
}

/// The HTTP routes (without TLS), for tests and for [`serve`]. With `events`, skipped injections
/// are also reported as Kubernetes Events on the pod.
pub fn router(template: SidecarTemplate, events: Option<Client>) -> Router {
    Router::new()
        .route("/inject", post(inject_handler))
        .route("/validate", post(validate_handler))
        .with_state(Arc::new(AppState {
            template,
            events,
            bundle: None,
        }))
}

/// [`router`] injecting the mesh CA's current `bundle`.
fn router_following(
    template: SidecarTemplate,
    events: Option<Client>,
    bundle: tokio::sync::watch::Receiver<String>,
) -> Router {
    Router::new()
        .route("/inject", post(inject_handler))
        .route("/validate", post(validate_handler))
        .with_state(Arc::new(AppState {
            template,
            events,
            bundle: Some(bundle),
        }))
}

/// Records a Warning Event about a pod being created (it has no UID yet, so it is named).
async fn pod_event(
    client: Client,
    namespace: String,
    pod: String,
    reason: &'static str,
    note: &'static str,
) {
    use k8s_openapi::api::core::v1::{Event, ObjectReference};
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    // A pod of a Deployment is known only by its generateName (`web-7d9f-`) at admission: the
    // event's own name must still be a valid DNS subdomain.
    let base = pod.trim_end_matches(['-', '.']);
    let base = if base.is_empty() {
        "qmesh-injection"
    } else {
        base
    };
    let event = Event {
        metadata: kube::api::ObjectMeta {
            generate_name: Some(format!("{base}.")),
            ..Default::default()
        },
        involved_object: ObjectReference {
            kind: Some("Pod".into()),
            api_version: Some("v1".into()),
            name: Some(pod),
            namespace: Some(namespace.clone()),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(note.into()),
        type_: Some("Warning".into()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        source: Some(k8s_openapi::api::core::v1::EventSource {
            component: Some("qmesh-injector".into()),
            host: None,
        }),
        ..Default::default()
    };
    let api: kube::Api<Event> = kube::Api::namespaced(client, &namespace);
    if let Err(error) = api.create(&Default::default(), &event).await {
        tracing::warn!(%error, "could not record the injection event");
    }
}

/// The sidecar template from the configuration, `native` decided by the server's version.
pub fn template(config: &WebhookConfig, native: bool) -> SidecarTemplate {
    SidecarTemplate {
        image: config.sidecar_image.clone(),
        cpu_request: config.sidecar_cpu_request.clone(),
        cpu_limit: config.sidecar_cpu_limit.clone(),
        memory_request: config.sidecar_memory_request.clone(),
        memory_limit: config.sidecar_memory_limit.clone(),
        log_level: config.sidecar_log_level.clone(),
        data_size: config.sidecar_data_size.clone(),
        control_plane: config.control_plane_address.clone(),
        trust_bundle: String::new(),
        native,
    }
}

/// Whether the API server supports native sidecars (Kubernetes ≥ 1.29).
pub async fn supports_native_sidecars(client: &Client) -> bool {
    match client.apiserver_version().await {
        Ok(v) => {
            let minor: u32 = v.minor.trim_end_matches('+').parse().unwrap_or(0);
            let major: u32 = v.major.parse().unwrap_or(0);
            major > 1 || (major == 1 && minor >= 29)
        }
        Err(_) => false,
    }
}

async fn inject_handler(
    State(state): State<Arc<AppState>>,
    Json(review): Json<AdmissionReview<Pod>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            webhook_answered("inject", WebhookResult::Error);
            return Json(
                AdmissionResponse::invalid(format!("not an AdmissionReview request: {e}"))
                    .into_review(),
            );
        }
    };
    let response = match &state.bundle {
        Some(bundle) => {
            let mut template = state.template.clone();
            template.trust_bundle = bundle.borrow().clone();
            decide_injection(&request, &template)
        }
        None => decide_injection(&request, &state.template),
    };
    // Injection refuses a pod only when it failed (serialising, patching).
    webhook_answered(
        "inject",
        match (response.allowed, response.patch.is_some()) {
            (false, _) => WebhookResult::Error,
            (true, true) => WebhookResult::Injected,
            (true, false) => WebhookResult::Skipped,
        },
    );
    if response.warnings.is_some()
        && let Some(client) = state.events.clone()
    {
        let pod = Some(request.name.clone())
            .filter(|n| !n.is_empty())
            .or_else(|| {
                request
                    .object
                    .as_ref()
                    .and_then(|p| p.metadata.generate_name.clone())
            })
            .unwrap_or_default();
        let namespace = request
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        tokio::spawn(pod_event(
            client,
            namespace,
            pod,
            "InjectionSkipped",
            Skip::HostNetwork.message(),
        ));
    }
    Json(response.into_review())
}

/// The admission answer for one pod.
pub fn decide_injection(
    request: &AdmissionRequest<Pod>,
    template: &SidecarTemplate,
) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    let Some(pod) = &request.object else {
        return response;
    };
    match inject(pod, template) {
        Ok(injected) => {
            let (Ok(before), Ok(after)) =
                (serde_json::to_value(pod), serde_json::to_value(&injected))
            else {
                return response.deny("qmesh: could not serialise the pod for injection");
            };
            let patch = json_patch::diff(&before, &after);
            match response.with_patch(patch) {
                Ok(r) => r,
                Err(e) => AdmissionResponse::from(request)
                    .deny(format!("qmesh: injection patch failed: {e}")),
            }
        }
        Err(Skip::HostNetwork) => {
            let mut r = response;
            r.warnings = Some(vec![Skip::HostNetwork.message().to_owned()]);
            tracing::info!(pod = ?request.name, namespace = ?request.namespace, "{}", Skip::HostNetwork.message());
            r
        }
        Err(_) => response,
    }
}

async fn validate_handler(
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            webhook_answered("validate", WebhookResult::Error);
            return Json(
                AdmissionResponse::invalid(format!("not an AdmissionReview request: {e}"))
                    .into_review(),
            );
        }
    };
    let response = decide_validation(&request);
    webhook_answered(
        "validate",
        if response.allowed {
            WebhookResult::Allowed
        } else {
            WebhookResult::Denied
        },
    );
    Json(response.into_review())
}

/// The admission answer for a Queue or Subscription.
pub fn decide_validation(request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    let Some(object) = &request.object else {
        return response;
    };
    let value = match serde_json::to_value(object) {
        Ok(v) => v,
        Err(e) => return response.deny(format!("unreadable object: {e}")),
    };
    let old = request
        .old_object
        .as_ref()
        .and_then(|o| serde_json::to_value(o).ok());
    let result = match request.kind.kind.as_str() {
        "Queue" => serde_json::from_value::<Queue>(value)
            .map_err(|e| e.to_string())
            .and_then(|q| q.validate().map_err(|e| e.to_string())),
        "Subscription" => serde_json::from_value::<Subscription>(value)
            .map_err(|e| e.to_string())
            .and_then(|s| {
                let old: Option<Subscription> = old.and_then(|o| serde_json::from_value(o).ok());
                match (&request.operation, old) {
                    (Operation::Update, Some(old)) => s.validate_update(&old),
                    _ => s.validate(),
                }
                .map_err(|e| e.to_string())
            }),
        _ => Ok(()),
    };
    match result {
        Ok(()) => response,
        Err(message) => response.deny(message),
    }
}

/// Serves the webhooks over HTTPS until `shutdown` resolves.
pub async fn serve(
    config: WebhookConfig,
    client: Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let native = supports_native_sidecars(&client).await;
    let resolver = if config.cert_manager {
        let resolver = tls::Resolver::new(load_files(&config)?.certified_key()?);
        tokio::spawn(follow_files(config.clone(), Arc::clone(&resolver)));
        resolver
    } else {
        let manager = tls::Manager::start(
            client.clone(),
            &config.namespace,
            &config.tls_secret,
            &config.service,
            config.cert_validity,
            (
                config.mutating_webhook_config.clone(),
                config.validating_webhook_config.clone(),
            ),
        )
        .await?;
        let resolver = Arc::clone(&manager.resolver);
        tokio::spawn(manager.maintain(Duration::from_secs(60)));
        resolver
    };
    let listener = TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("binding the webhook on {}", config.addr))?;
    tracing::info!(addr = %config.addr, native_sidecars = native, "admission webhooks listening");
    let bundle = crate::mesh_ca::follow_bundle(
        client.clone(),
        config.namespace.clone(),
        config.trust_domain.clone(),
        Duration::from_secs(30),
    )
    .await
    .context("reading the mesh CA's trust bundle")?;
    serve_tls(
        listener,
        resolver,
        router_following(template(&config, native), Some(client.clone()), bundle),
        shutdown,
    )
    .await
}

/// Serves `router` over TLS with the certificate `resolver` currently holds.
pub async fn serve_tls(
    listener: TcpListener,
    resolver: Arc<tls::Resolver>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = &mut shutdown => return Ok(()),
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

fn load_files(config: &WebhookConfig) -> anyhow::Result<tls::Material> {
    let read = |f: &str| {
        std::fs::read_to_string(config.tls_dir.join(f))
            .with_context(|| format!("reading {}", config.tls_dir.join(f).display()))
    };
    Ok(tls::Material {
        ca_bundle: String::new(),
        cert: read("tls.crt")?,
        key: read("tls.key")?,
        issued_at: 0,
        valid_seconds: 0,
    })
}

async fn follow_files(config: WebhookConfig, resolver: Arc<tls::Resolver>) {
    let mut last = load_files(&config).ok();
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let now = load_files(&config).ok();
        if now.is_some() && now != last {
            if let Some(key) = now.as_ref().and_then(|m| m.certified_key().ok()) {
                resolver.swap(key);
                tracing::info!("reloaded the cert-manager certificate");
            }
            last = now;
        }
    }
}
