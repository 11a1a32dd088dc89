//! Pod selectors of `publishers` / `consumers`: labels (`matchLabels` + `matchExpressions`) and
//! optionally the service accounts the pods must run as, evaluated against a sidecar's labels and
//! service account, with the checks the API server does not make for a selector embedded in a
//! custom resource.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::FieldError;

/// Which pods: a label selector, and optionally the service accounts they must run as (both must
/// hold). Labels are chosen by whoever creates a pod; a service account is proven (TokenReview, then
/// the sidecar's certificate), so `serviceAccounts` is what makes a selector a security boundary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSelector {
    /// `matchLabels` and `matchExpressions`, as in a Kubernetes label selector.
    #[serde(flatten)]
    pub labels: LabelSelector,
    /// Only pods running as one of these service accounts of the namespace. Absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_accounts: Option<Vec<String>>,
}

impl PodSelector {
    /// Whether a pod with `labels` running as `service_account` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>, service_account: &str) -> bool {
        labels_match(&self.labels, labels)
            && self
                .service_accounts
                .as_ref()
                .is_none_or(|accounts| accounts.iter().any(|a| a == service_account))
    }
}

impl From<LabelSelector> for PodSelector {
    fn from(labels: LabelSelector) -> Self {
        Self {
            labels,
            service_accounts: None,
        }
    }
}

/// Checks a pod selector: its label expressions, and service accounts that are DNS names.
pub(crate) fn check_pod_selector(selector: &PodSelector, path: &str, errors: &mut Vec<FieldError>) {
    check_selector(&selector.labels, path, errors);
    for (i, account) in selector.service_accounts.iter().flatten().enumerate() {
        let ok = !account.is_empty()
            && account.len() <= 253
            && account
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !ok {
            errors.push(FieldError::new(
                format!("{path}.serviceAccounts[{i}]"),
                format!("{account:?} is not a service account name"),
            ));
        }
    }
}

/// Whether `labels` are selected by `selector`. An empty selector selects everything, as in Kubernetes.
/// Expressions with an unknown operator select nothing (and are refused by validation).
pub fn labels_match(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(key, value)| labels.get(key) == Some(value));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|expr| {
        let values = expr.values.as_deref().unwrap_or_default();
        let current = labels.get(&expr.key);
        match expr.operator.as_str() {
            "In" => current.is_some_and(|v| values.contains(v)),
            "NotIn" => current.is_none_or(|v| !values.contains(v)),
            "Exists" => current.is_some(),
            "DoesNotExist" => current.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

/// Checks a selector's expressions: known operators, and values present exactly when the operator
/// needs them.
pub(crate) fn check_selector(selector: &LabelSelector, path: &str, errors: &mut Vec<FieldError>) {
    for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
        let at = format!("{path}.matchExpressions[{i}]");
        let has_values = expr.values.as_ref().is_some_and(|v| !v.is_empty());
        match expr.operator.as_str() {
            "In" | "NotIn" if !has_values => errors.push(FieldError::new(
                format!("{at}.values"),
                format!("operator {} needs at least one value", expr.operator),
            )),
            "Exists" | "DoesNotExist" if has_values => errors.push(FieldError::new(
                format!("{at}.values"),
                format!("operator {} takes no values", expr.operator),
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => errors.push(FieldError::new(
                format!("{at}.operator"),
                format!("unknown operator {other:?}: use In, NotIn, Exists or DoesNotExist"),
            )),
        }
        if expr.key.is_empty() {
            errors.push(FieldError::new(format!("{at}.key"), "must not be empty"));
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn empty_selector_selects_every_pod() {
        assert!(labels_match(
            &LabelSelector::default(),
            &labels(&[("app", "x")])
        ));
    }

    #[test]
    fn match_labels_and_expressions_must_all_hold() {
        let selector = LabelSelector {
            match_labels: Some(labels(&[("app", "billing")])),
            match_expressions: Some(vec![
                expr("tier", "In", &["worker", "batch"]),
                expr("canary", "DoesNotExist", &[]),
            ]),
        };
        assert!(labels_match(
            &selector,
            &labels(&[("app", "billing"), ("tier", "worker")])
        ));
        assert!(!labels_match(
            &selector,
            &labels(&[("app", "billing"), ("tier", "web")])
        ));
        assert!(!labels_match(
            &selector,
            &labels(&[("app", "billing"), ("tier", "batch"), ("canary", "1")])
        ));
        assert!(!labels_match(
            &selector,
            &labels(&[("app", "shipping"), ("tier", "worker")])
        ));
    }

    #[test]
    fn service_accounts_must_match_too_and_are_checked() {
        let selector = PodSelector {
            labels: LabelSelector {
                match_labels: Some(labels(&[("app", "billing")])),
                ..Default::default()
            },
            service_accounts: Some(vec!["billing".into()]),
        };
        let billing = labels(&[("app", "billing")]);
        assert!(selector.matches(&billing, "billing"));
        assert!(
            !selector.matches(&billing, "default"),
            "labels alone are not enough"
        );
        assert!(!selector.matches(&labels(&[]), "billing"));
        assert!(PodSelector::default().matches(&labels(&[]), "anyone"));
        // YAML: the service accounts sit next to matchLabels.
        let parsed: PodSelector =
            serde_yaml::from_str("{matchLabels: {app: billing}, serviceAccounts: [billing]}")
                .unwrap();
        assert_eq!(parsed, selector);
        let mut errors = Vec::new();
        let bad = PodSelector {
            service_accounts: Some(vec!["Not Valid".into()]),
            ..Default::default()
        };
        check_pod_selector(&bad, "spec.publishers", &mut errors);
        assert_eq!(errors[0].field, "spec.publishers.serviceAccounts[0]");
    }

    #[test]
    fn not_in_selects_pods_without_the_label() {
        let selector = LabelSelector {
            match_expressions: Some(vec![expr("env", "NotIn", &["prod"])]),
            ..Default::default()
        };
        assert!(labels_match(&selector, &labels(&[])));
        assert!(!labels_match(&selector, &labels(&[("env", "prod")])));
    }

    #[test]
    fn unknown_operator_is_refused_and_selects_nothing() {
        let selector = LabelSelector {
            match_expressions: Some(vec![expr("env", "Like", &["p"])]),
            ..Default::default()
        };
        assert!(!labels_match(&selector, &labels(&[("env", "p")])));
        let mut errors = Vec::new();
        check_selector(&selector, "spec.consumers", &mut errors);
        assert_eq!(
            errors[0].field,
            "spec.consumers.matchExpressions[0].operator"
        );
    }
}
