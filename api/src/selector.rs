//! Label selectors (`matchLabels` + `matchExpressions`) evaluated against a pod's labels, with the
//! checks the API server does not make for a selector embedded in a custom resource.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::validate::FieldError;

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
