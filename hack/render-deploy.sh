#!/usr/bin/env bash
# Renders deploy/qmesh.yaml (the plain-manifest install) from the Helm chart with default values.
# A test fails when the committed file is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
HELM=${HELM:-$(hack/k8s-test-env.sh)/helm}
{
  echo "# qmesh plain-manifest install, rendered from charts/qmesh with default values by hack/render-deploy.sh."
  echo "# Install: kubectl apply -f crds/ -f deploy/qmesh.yaml"
  echo "# No PodDisruptionBudget here (its API version depends on the server: the chart picks it)."
  "$HELM" template qmesh charts/qmesh --namespace qmesh-system --set createNamespace=true \
    --set podDisruptionBudget.enabled=false
} > deploy/qmesh.yaml
echo "wrote deploy/qmesh.yaml" >&2
