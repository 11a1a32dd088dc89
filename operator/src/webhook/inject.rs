//! Sidecar injection as a pure function: a Pod in, the Pod with the qmesh sidecar out (or the reason
//! it is left alone). The webhook turns the difference into a JSON patch; golden files pin the result.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
        ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, Pod, Probe,
        ProjectedVolumeSource, ResourceFieldSelector, ResourceRequirements, SeccompProfile,
        SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};

/// Name of the injected container.
pub const CONTAINER: &str = "qmesh-sidecar";
/// Annotation set on injected pods.
pub const INJECTED: &str = "qmesh.io/injected";
/// Label (pod) or namespace label value that opts in/out.
pub const INJECT_LABEL: &str = "qmesh.io/inject";
/// Per-pod overrides.
pub const CPU_ANNOTATION: &str = "qmesh.io/sidecar-cpu";
/// Per-pod overrides.
pub const MEMORY_ANNOTATION: &str = "qmesh.io/sidecar-memory";
/// Per-pod overrides.
pub const LOG_LEVEL_ANNOTATION: &str = "qmesh.io/log-level";
/// Per-pod overrides: the data volume's size (what the sidecar's backlog may take on disk).
pub const DATA_SIZE_ANNOTATION: &str = "qmesh.io/data-size";
/// Per-pod overrides: the port of the sidecar's AMQP 0-9-1 listener on 127.0.0.1 (default 5672),
/// or `off` (e.g. a pod whose own container listens on 5672).
pub const AMQP_PORT_ANNOTATION: &str = "qmesh.io/amqp-port";
/// Pod annotation: `"false"` injects the sidecar as a regular container with a preStop drain even
/// where the API server has native sidecars (e.g. for tooling that expects every container in
/// `containers`); native sidecars cannot be asked for where the server lacks them.
pub const NATIVE_ANNOTATION: &str = "qmesh.io/native-sidecar";

/// The annotation `kubectl` reads for the container to use when none is named.
const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

const DATA_VOLUME: &str = "qmesh-data";
const TOKEN_VOLUME: &str = "qmesh-token";
const TOKEN_DIR: &str = "/var/run/secrets/qmesh";
/// Lifetime of the sidecar's projected token: the shortest the API server issues, so a token that
/// leaks can be replayed for minutes at most (the kubelet renews it at 80 % of its life, and the
/// sidecar re-reads it for every join and certificate request).
pub const TOKEN_TTL_SECONDS: i64 = 600;

/// What the sidecar looks like, from the operator's configuration.
#[derive(Clone, Debug)]
pub struct SidecarTemplate {
    /// Image.
    pub image: String,
    /// CPU request.
    pub cpu_request: String,
    /// CPU limit.
    pub cpu_limit: Option<String>,
    /// Memory request.
    pub memory_request: String,
    /// Memory limit.
    pub memory_limit: String,
    /// Log level.
    pub log_level: String,
    /// Data volume size (`1Gi`).
    pub data_size: String,
    /// Control plane address sidecars dial (`host:port`, over TLS).
    pub control_plane: String,
    /// The mesh CA's roots (PEM): sidecars verify the control plane with them.
    pub trust_bundle: String,
    /// Inject as a native sidecar (API server ≥ 1.29).
    pub native: bool,
}

/// Why a pod was left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// Already has the sidecar (re-invocation or created injected).
    AlreadyInjected,
    /// Labelled `qmesh.io/inject=false`.
    OptedOut,
    /// Uses the host network: the sidecar's ports would collide with the node's.
    HostNetwork,
}

impl Skip {
    /// A message for the user (admission warning / event).
    pub fn message(&self) -> &'static str {
        match self {
            Skip::AlreadyInjected => "qmesh: pod already has the qmesh sidecar",
            Skip::OptedOut => "qmesh: pod opted out of injection (qmesh.io/inject=false)",
            Skip::HostNetwork => {
                "qmesh: sidecar not injected: the pod uses the host network, where the sidecar's ports would collide with the node's"
            }
        }
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        }),
    }
}

fn port(name: &str, number: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: number,
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(7073),
            ..Default::default()
        }),
        period_seconds: Some(period),
        ..Default::default()
    }
}

/// The AMQP port when the pod does not choose one (RabbitMQ's).
const DEFAULT_AMQP_PORT: u16 = 5672;

/// Injects the sidecar into `pod`, or says why not.
pub fn inject(pod: &Pod, template: &SidecarTemplate) -> Result<Pod, Skip> {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let has_sidecar = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == CONTAINER);
    if has_sidecar || annotations.get(INJECTED).is_some_and(|v| v == "true") {
        return Err(Skip::AlreadyInjected);
    }
    if labels.get(INJECT_LABEL).is_some_and(|v| v == "false") {
        return Err(Skip::OptedOut);
    }
    if spec.host_network == Some(true) {
        return Err(Skip::HostNetwork);
    }
    let cpu = annotations
        .get(CPU_ANNOTATION)
        .cloned()
        .unwrap_or_else(|| template.cpu_request.clone());
    let memory = annotations
        .get(MEMORY_ANNOTATION)
        .cloned()
        .unwrap_or_else(|| template.memory_request.clone());
    let log_level = annotations
        .get(LOG_LEVEL_ANNOTATION)
        .cloned()
        .unwrap_or_else(|| template.log_level.clone());
    // The data volume bounds the backlog on disk: the emptyDir's sizeLimit, an ephemeral-storage
    // request of the same size (so the scheduler places the pod where it fits), and three quarters
    // of it for messages (the rest is room for log records, segments waiting to be deleted and
    // relocation).
    let data_size = annotations
        .get(DATA_SIZE_ANNOTATION)
        .filter(|s| {
            qmesh_api::ByteSize::new(s.as_str())
                .bytes()
                .is_ok_and(|b| b > 0)
        })
        .cloned()
        .unwrap_or_else(|| template.data_size.clone());
    let owned_bytes = qmesh_api::ByteSize::new(data_size.as_str())
        .bytes()
        .map(|b| b / 4 * 3)
        .ok();
    // RabbitMQ client code finds the sidecar at QMESH_AMQP_URL (`None`: the listener is off).
    let amqp = match annotations.get(AMQP_PORT_ANNOTATION).map(|v| v.trim()) {
        Some("off" | "false") => None,
        Some(port) => Some(
            port.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .unwrap_or(DEFAULT_AMQP_PORT),
        ),
        None => Some(DEFAULT_AMQP_PORT),
    };
    let mut requests = BTreeMap::from([
        ("cpu".to_owned(), Quantity(cpu)),
        ("memory".to_owned(), Quantity(memory.clone())),
        ("ephemeral-storage".to_owned(), Quantity(data_size.clone())),
    ]);
    let mut limits = BTreeMap::new();
    if let Some(cpu_limit) = &template.cpu_limit {
        limits.insert("cpu".to_owned(), Quantity(cpu_limit.clone()));
    }
    // A per-pod memory request above the default limit raises the limit with it.
    let memory_limit = if annotations.contains_key(MEMORY_ANNOTATION) {
        memory
    } else {
        template.memory_limit.clone()
    };
    limits.insert("memory".to_owned(), Quantity(memory_limit));
    requests.retain(|_, q| !q.0.is_empty());

    let mut sidecar = Container {
        name: CONTAINER.into(),
        image: Some(template.image.clone()),
        args: Some(vec!["run".into()]),
        env: Some(
            vec![
                field_env("POD_NAME", "metadata.name"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
                field_env("POD_IP", "status.podIP"),
                env(
                    "QMESH_CONTROL_PLANE",
                    &format!("https://{}", template.control_plane),
                ),
                env("QMESH_TRUST_BUNDLE", &template.trust_bundle),
                env("QMESH_TOKEN_FILE", &format!("{TOKEN_DIR}/token")),
                env("QMESH_PEER_ADDR", "0.0.0.0:7070"),
                env("QMESH_GRPC_LISTEN", "127.0.0.1:7071"),
                env("QMESH_HTTP_LISTEN", "127.0.0.1:7072"),
                env("QMESH_ADMIN_LISTEN", "0.0.0.0:7073"),
                env(
                    "QMESH_AMQP_LISTEN",
                    &amqp.map_or("off".to_owned(), |p| format!("127.0.0.1:{p}")),
                ),
                env("QMESH_DATA_DIR", "/var/lib/qmesh"),
                env("QMESH_LOG_LEVEL", &log_level),
                env("QMESH_LOG_FORMAT", "json"),
                // glibc's malloc keeps a drained backlog's memory unless told to give it back: two
                // arenas and a low trim threshold keep RSS near what the owner holds.
                env("MALLOC_ARENA_MAX", "2"),
                env("MALLOC_TRIM_THRESHOLD_", "131072"),
                // The memory budget for held messages is derived from the container's limit.
                EnvVar {
                    name: "QMESH_MEMORY_LIMIT".into(),
                    value_from: Some(EnvVarSource {
                        resource_field_ref: Some(ResourceFieldSelector {
                            container_name: Some(CONTAINER.into()),
                            resource: "limits.memory".into(),
                            divisor: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]
            .into_iter()
            .chain(owned_bytes.map(|b| env("QMESH_MAX_OWNED_BYTES", &b.to_string())))
            .collect(),
        ),
        ports: Some(vec![port("qmesh-peer", 7070), port("qmesh-admin", 7073)]),
        readiness_probe: Some(probe("/readyz", 5)),
        liveness_probe: Some(probe("/healthz", 10)),
        resources: Some(ResourceRequirements {
            requests: Some(requests),
            limits: Some(limits),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: DATA_VOLUME.into(),
                mount_path: "/var/lib/qmesh".into(),
                ..Default::default()
            },
            VolumeMount {
                name: TOKEN_VOLUME.into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };

    let mut out = pod.clone();
    let spec = out.spec.get_or_insert_with(Default::default);
    // Apps find their sidecar through the environment.
    for c in spec.containers.iter_mut() {
        let envs = c.env.get_or_insert_with(Vec::new);
        let amqp_url = amqp.map(|p| format!("amqp://guest:guest@127.0.0.1:{p}/%2F"));
        let pairs = [
            ("QMESH_GRPC_ADDR", Some("127.0.0.1:7071")),
            ("QMESH_HTTP_ADDR", Some("127.0.0.1:7072")),
            ("QMESH_AMQP_URL", amqp_url.as_deref()),
        ];
        for (name, value) in pairs {
            if let Some(value) = value
                && !envs.iter().any(|e| e.name == name)
            {
                envs.push(env(name, value));
            }
        }
    }
    let native = template.native
        && annotations
            .get(NATIVE_ANNOTATION)
            .is_none_or(|v| v != "false");
    let first_app = spec.containers.first().map(|c| c.name.clone());
    if native {
        // Native sidecar: starts before the app containers — once its startup probe says it is
        // ready — and stops after them.
        sidecar.restart_policy = Some("Always".into());
        sidecar.startup_probe = Some(Probe {
            failure_threshold: Some(600),
            ..probe("/readyz", 1)
        });
        spec.init_containers
            .get_or_insert_with(Vec::new)
            .insert(0, sidecar);
    } else {
        // A regular container, first: the kubelet starts containers in order and runs each one's
        // postStart hook before starting the next, so the apps start once their broker is ready
        // (their first publishes find it); the preStop hook lets it deliver or keep its backlog
        // before the pod goes.
        let hook = |command: &str| LifecycleHandler {
            exec: Some(ExecAction {
                command: Some(vec!["/usr/local/bin/qmesh-sidecar".into(), command.into()]),
            }),
            ..Default::default()
        };
        sidecar.lifecycle = Some(Lifecycle {
            post_start: Some(hook("wait-ready")),
            pre_stop: Some(hook("drain")),
            ..Default::default()
        });
        spec.containers.insert(0, sidecar);
    }
    // The projected token needs a service account; the API server's ServiceAccount admission sets
    // `default` before webhooks run, so this only matters where that plugin is off.
    spec.service_account_name
        .get_or_insert_with(|| "default".into());
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.push(Volume {
        name: DATA_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: None,
            size_limit: Some(Quantity(data_size)),
        }),
        ..Default::default()
    });
    volumes.push(Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some("qmesh".into()),
                    expiration_seconds: Some(TOKEN_TTL_SECONDS),
                    path: "token".into(),
                }),
                ..Default::default()
            }]),
            default_mode: None,
        }),
        ..Default::default()
    });
    out.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(INJECTED.into(), "true".into());
    // `kubectl logs` and `exec` without `-c` pick the app, not the sidecar put before it.
    if let Some(app) = first_app {
        out.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .entry(DEFAULT_CONTAINER_ANNOTATION.into())
            .or_insert(app);
    }
    // Also a label, for the chart's NetworkPolicies (which select pods by label).
    out.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(INJECTED.into(), "true".into());
    Ok(out)
}
