{{/*
Chart name, truncated to the 63 characters Kubernetes allows in names and labels.
*/}}
{{- define "walhook.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full resource name: fullnameOverride, else "<release>-<chart name>" (just "<release>" when the
release name already contains the chart name). Hook resources append "-migrate", so keep room.
*/}}
{{- define "walhook.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 55 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 55 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 55 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart label value.
*/}}
{{- define "walhook.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of the server pods (Deployment, Service, PDB, ServiceMonitor). The component
label keeps the migrate Job's pod out of the Service.
*/}}
{{- define "walhook.selectorLabels" -}}
app.kubernetes.io/name: {{ include "walhook.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{/*
Labels of the server resources.
*/}}
{{- define "walhook.labels" -}}
helm.sh/chart: {{ include "walhook.chart" . }}
{{ include "walhook.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels of the migrate hook resources (Job, its pod, its ConfigMap and Secret).
*/}}
{{- define "walhook.migrateLabels" -}}
helm.sh/chart: {{ include "walhook.chart" . }}
app.kubernetes.io/name: {{ include "walhook.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: migrate
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
ServiceAccount of the server pods.
*/}}
{{- define "walhook.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "walhook.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Container image: repository@digest when a digest is set, else repository:tag (tag defaults to
the chart's appVersion).
*/}}
{{- define "walhook.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}
{{- end }}

{{/*
Port of a "host:port" listen address ("0.0.0.0:8080", "[::]:8080"), as a number.
Usage: include "walhook.listenPort" .Values.config.api.listen
*/}}
{{- define "walhook.listenPort" -}}
{{- . | toString | splitList ":" | last | int }}
{{- end }}

{{/*
walhook.toml rendered from .Values.config. Each key is written explicitly so the file is
valid TOML whatever YAML typed the value as:
- strings and durations go through `toString | toJson`: a JSON string is a valid TOML basic
  string (same escapes), and "5s" stays a string;
- lists of strings go through `toJson`: a JSON array of strings is a valid TOML array;
- integers go through `int64` (Helm reads YAML numbers as float64 and would print 1e+06);
- static_tokens become an array of TOML inline tables.
Secrets (database.url, auth.jwt_hs256_secret, secrets.encryption_key) are deliberately absent:
they reach walhook as environment variables from Secrets (see walhook.secretEnv).
*/}}
{{- define "walhook.configToml" -}}
# Rendered by the walhook Helm chart from .Values.config; do not edit in the cluster.
# Secrets are not in this file: they come from Kubernetes Secrets as WALHOOK_* variables.

[database]
pool_size = {{ .Values.config.database.pool_size | int64 }}
crm_schema = {{ .Values.config.database.crm_schema | toString | toJson }}
write_stall_after = {{ .Values.config.database.write_stall_after | toString | toJson }}
{{- with .Values.config.database.ca_cert }}
ca_cert = {{ . | toString | toJson }}
{{- end }}
{{- with .Values.config.database.runtime_role }}
runtime_role = {{ . | toString | toJson }}
{{- end }}

[api]
listen = {{ .Values.config.api.listen | toString | toJson }}
max_body_bytes = {{ .Values.config.api.max_body_bytes | int64 }}
rate_limit_per_second = {{ .Values.config.api.rate_limit_per_second | int64 }}
rate_limit_burst = {{ .Values.config.api.rate_limit_burst | int64 }}
max_endpoints_per_account = {{ .Values.config.api.max_endpoints_per_account | int64 }}
max_connections = {{ .Values.config.api.max_connections | int64 }}
header_timeout = {{ .Values.config.api.header_timeout | toString | toJson }}
idle_timeout = {{ .Values.config.api.idle_timeout | toString | toJson }}

[metrics]
listen = {{ .Values.config.metrics.listen | toString | toJson }}
max_connections = {{ .Values.config.metrics.max_connections | int64 }}
header_timeout = {{ .Values.config.metrics.header_timeout | toString | toJson }}
idle_timeout = {{ .Values.config.metrics.idle_timeout | toString | toJson }}

[replication]
slot = {{ .Values.config.replication.slot | toString | toJson }}
publication = {{ .Values.config.replication.publication | toString | toJson }}
status_interval = {{ .Values.config.replication.status_interval | toString | toJson }}
heartbeat_interval = {{ .Values.config.replication.heartbeat_interval | toString | toJson }}
recheck_interval = {{ .Values.config.replication.recheck_interval | toString | toJson }}
stream_timeout = {{ .Values.config.replication.stream_timeout | toString | toJson }}
replica_identity_full = {{ .Values.config.replication.replica_identity_full | toJson }}

[auth]
account_claim = {{ .Values.config.auth.account_claim | toString | toJson }}
{{- with .Values.config.auth.jwt_audience }}
jwt_audience = {{ . | toString | toJson }}
{{- end }}
{{- with .Values.config.auth.jwt_issuer }}
jwt_issuer = {{ . | toString | toJson }}
{{- end }}
static_tokens = [
{{- range .Values.config.auth.static_tokens }}
  { token_sha256 = {{ required "config.auth.static_tokens[].token_sha256 is required" .token_sha256 | toString | toJson }}, account_id = {{ required "config.auth.static_tokens[].account_id is required" .account_id | toString | toJson }}, user_id = {{ required "config.auth.static_tokens[].user_id is required" .user_id | toString | toJson }} },
{{- end }}
]

[dispatch]
allowed_cidrs = {{ .Values.config.dispatch.allowed_cidrs | default (list) | toJson }}
ca_certs = {{ .Values.config.dispatch.ca_certs | default (list) | toJson }}
retry_schedule = {{ .Values.config.dispatch.retry_schedule | default (list) | toJson }}
jitter = {{ .Values.config.dispatch.jitter | float64 }}
connect_timeout = {{ .Values.config.dispatch.connect_timeout | toString | toJson }}
request_timeout = {{ .Values.config.dispatch.request_timeout | toString | toJson }}
max_concurrency = {{ .Values.config.dispatch.max_concurrency | int64 }}
endpoint_concurrency = {{ .Values.config.dispatch.endpoint_concurrency | int64 }}
account_concurrency = {{ .Values.config.dispatch.account_concurrency | int64 }}
endpoint_queue = {{ .Values.config.dispatch.endpoint_queue | int64 }}
queue_capacity = {{ .Values.config.dispatch.queue_capacity | int64 }}
spill_after = {{ .Values.config.dispatch.spill_after | toString | toJson }}
poll_interval = {{ .Values.config.dispatch.poll_interval | toString | toJson }}
disable_after = {{ .Values.config.dispatch.disable_after | toString | toJson }}
memory_limit = {{ .Values.config.dispatch.memory_limit | toString | toJson }}

[retention]
delivered = {{ .Values.config.retention.delivered | toString | toJson }}
failed = {{ .Values.config.retention.failed | toString | toJson }}
payloads = {{ .Values.config.retention.payloads | toString | toJson }}
interval = {{ .Values.config.retention.interval | toString | toJson }}
batch_size = {{ .Values.config.retention.batch_size | int64 }}

[backfill]
chunk_size = {{ .Values.config.backfill.chunk_size | int64 }}
rows_per_second = {{ .Values.config.backfill.rows_per_second | int64 }}

[log]
format = {{ .Values.config.log.format | toString | toJson }}
level = {{ .Values.config.log.level | toString | toJson }}

[shutdown]
grace = {{ .Values.config.shutdown.grace | toString | toJson }}
{{- end }}

{{/*
Data of the Secret the chart creates when secret.create is true (base64-encoded values).
Only the secrets that are not taken from an existing Secret are stored.
*/}}
{{- define "walhook.secretData" -}}
{{- if not .Values.database.existingSecret }}
{{ .Values.database.urlKey }}: {{ required "secret.databaseUrl is required when secret.create is true and database.existingSecret is empty" .Values.secret.databaseUrl | toString | b64enc | quote }}
{{- end }}
{{- if and (not .Values.jwt.existingSecret) .Values.secret.jwtHs256Secret }}
{{ .Values.jwt.secretKey }}: {{ .Values.secret.jwtHs256Secret | toString | b64enc | quote }}
{{- end }}
{{- if and (not .Values.encryption.existingSecret) .Values.secret.encryptionKey }}
{{ .Values.encryption.secretKey }}: {{ .Values.secret.encryptionKey | toString | b64enc | quote }}
{{- end }}
{{- end }}

{{/*
Environment variables carrying the secrets, each a secretKeyRef: an existingSecret when one is
named, else the chart-created Secret. Call with a dict:
  root: the top-level context
  createdSecret: name of the chart-created Secret to use (differs for the migrate hook, which
                 runs before the release's own Secret exists)
  migrate: true for the migrate hook, whose URL may come from migrate.existingSecret
*/}}
{{- define "walhook.secretEnv" -}}
{{- $root := .root }}
{{- $dbSecret := $root.Values.database.existingSecret }}
{{- $dbKey := $root.Values.database.urlKey }}
{{- if and (not $dbSecret) $root.Values.secret.create }}
{{- $dbSecret = .createdSecret }}
{{- end }}
{{- if and .migrate $root.Values.migrate.existingSecret }}
{{- $dbSecret = $root.Values.migrate.existingSecret }}
{{- $dbKey = $root.Values.migrate.urlKey }}
{{- end }}
{{- if not $dbSecret }}
{{- fail "walhook: the PostgreSQL URL must come from a Secret: set database.existingSecret (and database.urlKey), or secret.create=true with secret.databaseUrl" }}
{{- end -}}
- name: WALHOOK_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ $dbSecret }}
      key: {{ $dbKey }}
{{- $jwtSecret := $root.Values.jwt.existingSecret }}
{{- if and (not $jwtSecret) $root.Values.secret.create $root.Values.secret.jwtHs256Secret }}
{{- $jwtSecret = .createdSecret }}
{{- end }}
{{- if $jwtSecret }}
- name: WALHOOK_AUTH__JWT_HS256_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ $jwtSecret }}
      key: {{ $root.Values.jwt.secretKey }}
{{- end }}
{{- $encSecret := $root.Values.encryption.existingSecret }}
{{- if and (not $encSecret) $root.Values.secret.create $root.Values.secret.encryptionKey }}
{{- $encSecret = .createdSecret }}
{{- end }}
{{- if $encSecret }}
- name: WALHOOK_SECRETS__ENCRYPTION_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $encSecret }}
      key: {{ $root.Values.encryption.secretKey }}
{{- end }}
{{- end }}

{{/*
Pod-level securityContext.
*/}}
{{- define "walhook.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.podSecurityContext.runAsUser }}
runAsUser: {{ . | int64 }}
{{- end }}
{{- with .Values.podSecurityContext.runAsGroup }}
runAsGroup: {{ . | int64 }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Container-level securityContext.
*/}}
{{- define "walhook.containerSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.podSecurityContext.runAsUser }}
runAsUser: {{ . | int64 }}
{{- end }}
{{- with .Values.podSecurityContext.runAsGroup }}
runAsGroup: {{ . | int64 }}
{{- end }}
readOnlyRootFilesystem: {{ .Values.securityContext.readOnlyRootFilesystem }}
allowPrivilegeEscalation: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}
