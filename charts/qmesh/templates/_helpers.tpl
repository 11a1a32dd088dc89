{{- define "qmesh.name" -}}qmesh{{- end -}}

{{- define "qmesh.operatorName" -}}qmesh-operator{{- end -}}

{{- define "qmesh.labels" -}}
app.kubernetes.io/name: qmesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "qmesh.selectorLabels" -}}
app.kubernetes.io/name: qmesh
app.kubernetes.io/component: operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "qmesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "qmesh.sidecarImage" -}}
{{ .Values.sidecar.image.repository }}:{{ .Values.sidecar.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "qmesh.excludedNamespaces" -}}
- key: kubernetes.io/metadata.name
  operator: NotIn
  values: [kube-system, {{ .Release.Namespace }}]
# API servers before 1.21 do not set kubernetes.io/metadata.name: there, namespaces labelled
# qmesh.io/inject=disabled (the chart's own, when it creates it; kube-system by hand) are left out.
- key: qmesh.io/inject
  operator: NotIn
  values: [disabled]
{{- end -}}
