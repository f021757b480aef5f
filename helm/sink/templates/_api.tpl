{{/*
`sink serve` (usage over HTTP), apart from the workers. Its pods carry their own
app.kubernetes.io/name (<name>-api), so the workers' Service, PodDisruptionBudget and
ServiceMonitor, which select by name and instance, never pick them up.
*/}}
{{- define "sink.api.fullname" -}}
{{- printf "%s-api" (include "sink.fullname" . | trunc 59 | trimSuffix "-") }}
{{- end }}

{{- define "sink.api.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-api" (include "sink.name" . | trunc 59 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sink.api.labels" -}}
helm.sh/chart: {{ include "sink.chart" . }}
{{ include "sink.api.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: api
app.kubernetes.io/part-of: {{ include "sink.name" . }}
{{- end }}

{{/* config.api.port (sink/config.py's default 8090). */}}
{{- define "sink.api.port" -}}
{{- $api := include "sink.section" (dict "root" . "name" "api") | fromJson }}
{{- hasKey $api "port" | ternary (get $api "port") 8090 | int }}
{{- end }}

{{/* The Secret and key of the API's (read-only) ClickHouse URL; empty when there is none. */}}
{{- define "sink.api.clickhouseSecret" -}}
{{- $a := .Values.apiServer }}
{{- if $a.existingSecret }}
{{- toJson (dict "name" $a.existingSecret "key" $a.clickhouseUrlKey) }}
{{- else if $a.clickhouseUrl }}
{{- toJson (dict "name" (include "sink.api.fullname" .) "key" $a.clickhouseUrlKey) }}
{{- else if or .Values.secrets.existingSecret .Values.secrets.clickhouseUrl }}
{{- toJson (dict "name" (include "sink.secretName" .) "key" .Values.secrets.keys.clickhouseUrl) }}
{{- end }}
{{- end }}

{{- define "sink.api.validate" -}}
{{- $api := include "sink.section" (dict "root" . "name" "api") | fromJson }}
{{- if eq (include "sink.api.port" . | int) 0 }}
{{- fail "config.api.port must be a fixed port (not 0) in Kubernetes" }}
{{- end }}
{{- if and (not $api.tokens) (not .Values.apiServer.tokensSecret) }}
{{- fail "apiServer.enabled needs tokens: config.api.tokens ([{namespace, sha256}]) or apiServer.tokensSecret; sink serve refuses to start without any" }}
{{- end }}
{{- end }}
