{{- define "localship.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Names of this release's objects; cluster-scoped ones too, so two releases do not collide. */}}
{{- define "localship.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "localship.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "localship.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "localship.selectorLabels" -}}
app.kubernetes.io/name: {{ include "localship.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "localship.shipperSelectorLabels" -}}
app.kubernetes.io/name: {{ include "localship.name" . }}-logshipper
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "localship.labels" -}}
{{ include "localship.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "localship.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Every base path of nodePathMap, once each, sorted: each is a hostPath volume. */}}
{{- define "localship.basePaths" -}}
{{- $paths := list }}
{{- range .Values.nodePathMap }}
{{- range .paths }}
{{- $paths = append $paths . }}
{{- end }}
{{- end }}
{{- toJson ($paths | uniq | sortAlpha) }}
{{- end }}

{{/* The Secret holding the shipper's S3 keys, if there is one. */}}
{{- define "localship.s3Secret" -}}
{{- if .Values.shipping.existingSecret }}
{{- .Values.shipping.existingSecret }}
{{- else if .Values.shipping.accessKeyId }}
{{- printf "%s-s3" (include "localship.fullname" .) }}
{{- end }}
{{- end }}

{{/* The base paths the admission policy allows, as a CEL list: policy.allowedBasePaths, else every base path of nodePathMap. */}}
{{- define "localship.policyBases" -}}
{{- $bases := .Values.policy.allowedBasePaths | default (include "localship.basePaths" . | fromJsonArray) }}
{{- toJson $bases }}
{{- end }}
