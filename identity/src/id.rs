//! A workload's identity: the SPIFFE ID `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`
//! (the URI SAN of its certificate) and the sidecar it belongs to (`<sidecar>.<namespace>.sidecar.qmesh`,
//! its DNS SAN, which is also the TLS server name a peer dials it by).

use std::fmt;

use x509_parser::{extensions::GeneralName, prelude::FromDer};

use crate::Error;

/// The DNS suffix of sidecar names in certificates.
pub const SIDECAR_DNS_SUFFIX: &str = "sidecar.qmesh";

/// The DNS name a sidecar's certificate carries, and peers verify when they dial it.
pub fn sidecar_dns_name(namespace: &str, sidecar: &str) -> String {
    format!("{sidecar}.{namespace}.{SIDECAR_DNS_SUFFIX}")
}

/// Who a certificate says its holder is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadId {
    /// The mesh's trust domain (`cluster.local`, `qmesh.local` for a local mesh).
    pub trust_domain: String,
    /// Namespace of the pod (of the local sidecar).
    pub namespace: String,
    /// Its service account (`default` for a local sidecar).
    pub service_account: String,
    /// The pod (local sidecar) name.
    pub sidecar: String,
}

impl WorkloadId {
    /// The SPIFFE ID.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    /// The sidecar's DNS name ([`sidecar_dns_name`]).
    pub fn dns_name(&self) -> String {
        sidecar_dns_name(&self.namespace, &self.sidecar)
    }

    /// Checks every part is a DNS label (the sidecar name may be a DNS subdomain), so the names
    /// put in a certificate are unambiguous.
    pub fn validate(&self) -> Result<(), Error> {
        let label = |what: &str, s: &str| -> Result<(), Error> {
            let ok = !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-');
            if ok {
                Ok(())
            } else {
                Err(Error::Identity(format!(
                    "{what} {s:?} is not a DNS label (lowercase letters, digits and '-', at most 63)"
                )))
            }
        };
        label("namespace", &self.namespace)?;
        label("service account", &self.service_account)?;
        for part in self.sidecar.split('.') {
            label("sidecar name", part)?;
        }
        for part in self.trust_domain.split('.') {
            label("trust domain", part)?;
        }
        Ok(())
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>` (the sidecar comes from elsewhere).
    pub fn parse_spiffe(uri: &str) -> Option<(String, String, String)> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (td, path) = rest.split_once('/')?;
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None)
                if !td.is_empty() && !ns.is_empty() && !sa.is_empty() =>
            {
                Some((td.to_owned(), ns.to_owned(), sa.to_owned()))
            }
            _ => None,
        }
    }

    /// Reads the identity of a (chain-verified) end-entity certificate: exactly one SPIFFE URI SAN
    /// and a DNS SAN under `<namespace>.sidecar.qmesh`.
    pub fn from_certificate(der: &[u8]) -> Result<Self, Error> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|e| Error::Identity(format!("the certificate does not parse: {e}")))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| Error::Identity(format!("bad subjectAltName: {e}")))?
            .ok_or_else(|| Error::Identity("the certificate has no subjectAltName".into()))?;
        let mut uris = Vec::new();
        let mut dns = Vec::new();
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push(*u),
                GeneralName::DNSName(d) => dns.push(*d),
                _ => {}
            }
        }
        let [uri] = uris.as_slice() else {
            return Err(Error::Identity(format!(
                "the certificate must carry exactly one SPIFFE ID, not {}",
                uris.len()
            )));
        };
        let (trust_domain, namespace, service_account) = Self::parse_spiffe(uri)
            .ok_or_else(|| Error::Identity(format!("{uri:?} is not a qmesh SPIFFE ID")))?;
        let suffix = format!(".{namespace}.{SIDECAR_DNS_SUFFIX}");
        let sidecar = dns
            .iter()
            .find_map(|d| d.strip_suffix(&suffix))
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Error::Identity(format!(
                    "the certificate names no sidecar in namespace {namespace}"
                ))
            })?;
        Ok(Self {
            trust_domain,
            namespace,
            service_account,
            sidecar: sidecar.to_owned(),
        })
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (sidecar {}/{})",
            self.spiffe_id(),
            self.namespace,
            self.sidecar
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_and_reject_other_shapes() {
        let id = WorkloadId {
            trust_domain: "cluster.local".into(),
            namespace: "shop".into(),
            service_account: "orders".into(),
            sidecar: "orders-7d9f".into(),
        };
        assert_eq!(id.spiffe_id(), "spiffe://cluster.local/ns/shop/sa/orders");
        assert_eq!(
            WorkloadId::parse_spiffe(&id.spiffe_id()),
            Some(("cluster.local".into(), "shop".into(), "orders".into()))
        );
        for bad in [
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/orders/extra",
            "spiffe:///ns/shop/sa/orders",
            "https://cluster.local/ns/shop/sa/orders",
        ] {
            assert_eq!(WorkloadId::parse_spiffe(bad), None, "{bad}");
        }
        assert!(id.validate().is_ok());
        let upper = WorkloadId {
            namespace: "Shop".into(),
            ..id
        };
        assert!(upper.validate().is_err());
    }
}
