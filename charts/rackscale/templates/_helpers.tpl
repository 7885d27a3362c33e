{{/*
Names, labels and shared values of the rackscale chart.
*/}}

{{- define "rackscale.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rackscale.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of one component's objects: <fullname>-<component>. */}}
{{- define "rackscale.component" -}}
{{- printf "%s-%s" (include "rackscale.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rackscale.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "rackscale.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: pass (dict "root" $ "component" "operator"). */}}
{{- define "rackscale.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rackscale.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "rackscale.componentLabels" -}}
{{ include "rackscale.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "rackscale.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "rackscale.operatorServiceAccount" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "rackscale.component" (dict "root" . "component" "operator")) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* etcd client endpoints, comma-separated: the chart's StatefulSet or the external ones. */}}
{{- define "rackscale.etcdEndpoints" -}}
{{- if .Values.etcd.enabled }}
{{- $name := include "rackscale.component" (dict "root" . "component" "etcd") }}
{{- printf "http://%s.%s.svc:2379" $name .Release.Namespace }}
{{- else }}
{{- if not .Values.etcd.externalEndpoints }}
{{- fail "etcd.externalEndpoints must list the registry's etcd client URLs when etcd.enabled is false" }}
{{- end }}
{{- join "," .Values.etcd.externalEndpoints }}
{{- end }}
{{- end }}

{{/* Refuses settings the binaries cannot honour yet. */}}
{{- define "rackscale.validate" -}}
{{- if .Values.grpc.tls.enabled }}
{{- fail "grpc.tls.enabled: the rackscale binaries do not serve or call gRPC over TLS yet; keep it false and isolate the agent and engine ports with a NetworkPolicy (docs/helm.md)" }}
{{- end }}
{{- if and .Values.frontend.enabled (not .Values.frontend.deployment) }}
{{- fail "frontend.deployment must name the ModelDeployment the frontend serves (or set frontend.enabled=false)" }}
{{- end }}
{{- end }}

{{/* Whether the Prometheus Operator's monitors can be rendered. */}}
{{- define "rackscale.monitors" -}}
{{- if and .Values.monitoring.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}true{{ end }}
{{- end }}
