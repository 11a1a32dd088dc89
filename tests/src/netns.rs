//! A network namespace of the test's own, joined to this host by a veth pair — the way to reach a
//! server from an address that is not loopback without leaving the machine (a pod's view of a
//! sidecar's port). Addresses come from 198.18.0.0/16, the range the test cluster gives pods.
//!
//! ```text
//!   host  qh<id> 198.18.<n>.1/30  ◀──veth──▶  qn<id> 198.18.<n>.2/30  namespace qmt-<id>
//! ```
//!
//! Needs root (CI runs as root); removed on drop.

use std::{net::Ipv4Addr, process::Command};

use anyhow::{Context, bail};

/// A network namespace with a veth link to the host.
pub struct NetNs {
    name: String,
    host_link: String,
    /// The host's end of the link.
    pub host_ip: Ipv4Addr,
    /// The namespace's end of the link.
    pub ns_ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (apt-get install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {} (network namespaces need root)",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl NetNs {
    /// Creates the namespace and its link.
    pub fn create() -> anyhow::Result<Self> {
        let r = crate::process::loopback_ip().octets();
        let id = format!("{:02x}{:02x}{:02x}", r[1], r[2], r[3]);
        // A /30 per namespace: 198.18.<n>.<4k+1> and <4k+2>.
        let (n, k) = (r[2], (r[3] % 63) * 4);
        let ns = Self {
            name: format!("qmt-{id}"),
            host_link: format!("qh{id}"),
            host_ip: Ipv4Addr::new(198, 18, n, k + 1),
            ns_ip: Ipv4Addr::new(198, 18, n, k + 2),
        };
        let ns_link = format!("qn{id}");
        ip(&["netns", "add", &ns.name])?;
        // From here on, drop removes what was made.
        ip(&[
            "link",
            "add",
            &ns.host_link,
            "type",
            "veth",
            "peer",
            "name",
            &ns_link,
            "netns",
            &ns.name,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_link,
        ])?;
        ip(&["link", "set", &ns.host_link, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &ns_link])?;
        inside(&["link", "set", &ns_link, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `program args…` inside the namespace; returns its standard output.
    pub fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .with_context(|| format!("running {program} in {}", self.name))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_link]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
