{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "sink.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart unless the release name already holds it. */}}
{{- define "sink.fullname" -}}
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

{{- define "sink.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sink.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sink.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sink.labels" -}}
helm.sh/chart: {{ include "sink.chart" . }}
{{ include "sink.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "sink.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sink.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sink.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding connection URLs; empty when there is none. */}}
{{- define "sink.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else if or .Values.secrets.clickhouseUrl .Values.secrets.redisUrl .Values.secrets.kafkaSaslPassword .Values.secrets.redisPassword .Values.secrets.redisSentinelPassword }}
{{- include "sink.fullname" . }}
{{- end }}
{{- end }}

{{- define "sink.section" -}}
{{- $config := .root.Values.config | default dict }}
{{- get $config .name | default dict | toJson }}
{{- end }}

{{/* HTTP port of worker process 0 (process i listens on port + i). */}}
{{- define "sink.httpPort" -}}
{{- $http := include "sink.section" (dict "root" . "name" "http") | fromJson }}
{{- $http.port | default 8080 | int }}
{{- end }}

{{/* Kafka coordinates for the autoscaler, from the worker config unless overridden. */}}
{{- define "sink.kafkaSetting" -}}
{{- $kafka := include "sink.section" (dict "root" .root "name" "kafka") | fromJson }}
{{- get $kafka .key | default .default }}
{{- end }}

{{/*
worker.drain_timeout in seconds, parsed as sink/config.py parses durations: a number of
seconds, or a number with one of the units ms, s, m, h, d.
*/}}
{{- define "sink.drainTimeout" -}}
{{- $worker := include "sink.section" (dict "root" . "name" "worker") | fromJson }}
{{- $raw := hasKey $worker "drain_timeout" | ternary (get $worker "drain_timeout") "30s" }}
{{- $text := toString $raw | trim | lower }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?\\s*(ms|s|m|h|d)?$" $text) }}
{{- fail (printf "config.worker.drain_timeout: %q is not a duration such as 500ms, 30s or 5m" $text) }}
{{- end }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $text }}
{{- $unit := trimPrefix $number $text | trim }}
{{- $scale := get (dict "ms" 0.001 "s" 1.0 "" 1.0 "m" 60.0 "h" 3600.0 "d" 86400.0) $unit }}
{{- mulf (float64 $number) $scale }}
{{- end }}

{{/* The worker config file, with the keys the chart relies on made explicit. */}}
{{- define "sink.config" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $worker := get $config "worker" | default dict }}
{{- if not (hasKey $worker "drain_timeout") }}
{{- $_ := set $worker "drain_timeout" "30s" }}
{{- end }}
{{- $_ := set $config "worker" $worker }}
{{- $http := get $config "http" | default dict }}
{{- $_ := set $http "port" (include "sink.httpPort" . | int) }}
{{- $_ := set $config "http" $http }}
{{- toYaml $config }}
{{- end }}

{{/* Rendering fails on settings that cannot work; each message says what to change. */}}
{{- define "sink.validate" -}}
{{- $drain := include "sink.drainTimeout" . | float64 }}
{{- $grace := .Values.terminationGracePeriodSeconds | float64 }}
{{- if le $grace $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be above config.worker.drain_timeout (%v seconds): Kubernetes would kill the worker before it drains" .Values.terminationGracePeriodSeconds $drain) }}
{{- end }}
{{- $http := include "sink.section" (dict "root" . "name" "http") | fromJson }}
{{- if and (hasKey $http "enabled") (not $http.enabled) }}
{{- fail "config.http.enabled must stay true: probes and metrics use the HTTP endpoints" }}
{{- end }}
{{- if eq (include "sink.httpPort" . | int) 0 }}
{{- fail "config.http.port must be a fixed port (not 0) in Kubernetes" }}
{{- end }}
{{- $secretKeys := dict "clickhouse" (list "url") "dedup" (list "redis_url" "password" "sentinel_password") "kafka" (list "sasl_password") }}
{{- range $section, $keys := $secretKeys }}
{{- $values := include "sink.section" (dict "root" $ "name" $section) | fromJson }}
{{- range $key := $keys }}
{{- if hasKey $values $key }}
{{- fail (printf "config.%s.%s would land in a ConfigMap: set it under secrets (or secrets.existingSecret) instead" $section $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- if not .Values.autoscaling.partitions }}
{{- fail "autoscaling.partitions is required with autoscaling.enabled: the partition count of the consumed topics" }}
{{- end }}
{{- $consumers := mul (int .Values.autoscaling.maxReplicaCount) (int .Values.workers) }}
{{- if gt $consumers (int .Values.autoscaling.partitions) }}
{{- fail (printf "autoscaling.maxReplicaCount (%d) x workers (%d) = %d consumers exceeds autoscaling.partitions (%d): consumers beyond the partition count sit idle" (int .Values.autoscaling.maxReplicaCount) (int .Values.workers) $consumers (int .Values.autoscaling.partitions)) }}
{{- end }}
{{- if gt (int .Values.autoscaling.minReplicaCount) (int .Values.autoscaling.maxReplicaCount) }}
{{- fail "autoscaling.minReplicaCount must not exceed autoscaling.maxReplicaCount" }}
{{- end }}
{{- else }}
{{- $consumers := mul (int .Values.replicaCount) (int .Values.workers) }}
{{- if and .Values.autoscaling.partitions (gt $consumers (int .Values.autoscaling.partitions)) }}
{{- fail (printf "replicaCount (%d) x workers (%d) exceeds autoscaling.partitions (%d)" (int .Values.replicaCount) (int .Values.workers) (int .Values.autoscaling.partitions)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* PromQL matchers for this release's series. */}}
{{- define "sink.promSelector" -}}
{{- if .Values.prometheusRule.selector }}
{{- .Values.prometheusRule.selector }}
{{- else }}
{{- printf "namespace=%q,job=%q" .Release.Namespace (include "sink.fullname" .) }}
{{- end }}
{{- end }}

{{/* Port name of worker process i: `http` for the first, `http-<i>` for the others. */}}
{{- define "sink.portName" -}}
{{- if eq (int .) 0 }}http{{ else }}{{ printf "http-%d" (int .) }}{{ end }}
{{- end }}
