//! The local mesh's certificate authority: `qmesh dev`, `qmesh demo` and `qmesh bench` sign their
//! sidecars' certificates with it and serve the control plane over TLS, so a local mesh runs the
//! same mutual-TLS code path as a cluster; `qmesh run` and `qmesh get` trust its `ca.crt`.
//!
//! ```text
//!   <ca dir>/ca.pem  root certificate + key (0600), made once, shared by every local control plane
//!   <ca dir>/ca.crt  the root alone: what clients trust (`--trust-bundle`)
//! ```

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use qmesh_identity::{Authority, Material, SharedAuthority, tls, transport};

/// The trust domain of local meshes.
pub const TRUST_DOMAIN: &str = "qmesh.local";
/// Lifetime of a local root.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Lifetime of the control plane's serving certificate.
const SERVING_VALIDITY: Duration = Duration::from_secs(365 * 86_400);

/// `$QMESH_LOCAL_CA_DIR`, else `$XDG_STATE_HOME/qmesh/local-ca` (`~/.local/state/qmesh/local-ca`).
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("QMESH_LOCAL_CA_DIR") {
        return PathBuf::from(dir);
    }
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir)
        .join("qmesh")
        .join("local-ca")
}

/// The trust bundle clients of a local control plane check it with.
pub fn bundle_path(dir: &Path) -> PathBuf {
    dir.join("ca.crt")
}

/// The authority kept in `dir`, made there first if there is none. Two processes starting at once
/// agree on one: the first to link its file in wins, the other reads it.
pub fn load_or_create(dir: &Path) -> anyhow::Result<Authority> {
    let file = dir.join("ca.pem");
    if !file.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let fresh = Authority::generate(TRUST_DOMAIN, ROOT_VALIDITY, None)?;
        let tmp = dir.join(format!(".ca.pem.{}", std::process::id()));
        std::fs::write(&tmp, format!("{}{}", fresh.cert_pem(), fresh.key_pem()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        }
        let linked = std::fs::hard_link(&tmp, &file);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("writing {}", file.display())),
        }
    }
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let split = text
        .find("-----BEGIN PRIVATE KEY-----")
        .with_context(|| format!("{} holds no private key", file.display()))?;
    let (cert, key) = text.split_at(split);
    let authority = Authority::from_pem(TRUST_DOMAIN, cert, key, cert)
        .with_context(|| format!("{} is not a usable CA", file.display()))?;
    let bundle = bundle_path(dir);
    if std::fs::read_to_string(&bundle).ok().as_deref() != Some(cert) {
        let tmp = dir.join(format!(".ca.crt.{}", std::process::id()));
        std::fs::write(&tmp, cert)?;
        std::fs::rename(&tmp, &bundle)?;
    }
    Ok(authority)
}

/// What a local control plane serves with: the authority that signs sidecars, and a TLS
/// configuration for its own certificate (valid for `ips`, `127.0.0.1` and `localhost`).
pub fn control_plane(
    authority: Authority,
    ips: &[IpAddr],
) -> anyhow::Result<(Arc<SharedAuthority>, transport::ServerConfigs)> {
    let mut ips = ips.to_vec();
    let loopback: IpAddr = [127, 0, 0, 1].into();
    if !ips.contains(&loopback) {
        ips.push(loopback);
    }
    let serving: Material =
        authority.issue_server(&["localhost".to_owned()], &ips, SERVING_VALIDITY)?;
    let config = Arc::new(tls::plain_server(&serving)?);
    Ok((
        SharedAuthority::new(authority),
        Arc::new(move || Arc::clone(&config)),
    ))
}

/// A channel to a control plane: `https://` verified against the bundle in `trust_bundle`,
/// `http://` as it is.
pub async fn connect(
    endpoint: &str,
    trust_bundle: &Path,
) -> anyhow::Result<tonic::transport::Channel> {
    let bundle = if endpoint.starts_with("https://") {
        Some(std::fs::read_to_string(trust_bundle).with_context(|| {
            format!(
                "reading the trust bundle {} (made by `qmesh dev`; or pass --trust-bundle)",
                trust_bundle.display()
            )
        })?)
    } else {
        None
    };
    Ok(transport::connect_url(endpoint, bundle.as_deref(), |e| {
        e.connect_timeout(Duration::from_secs(3))
    })
    .await?)
}
