{{/* Names are cut to 63 characters: the DNS label limit for Service names. */}}
{{- define "mayfly.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mayfly.fullname" -}}
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

{{- define "mayfly.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels must never change after install: Deployment selectors are immutable. */}}
{{- define "mayfly.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mayfly.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mayfly.labels" -}}
helm.sh/chart: {{ include "mayfly.chart" . }}
{{ include "mayfly.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: broker
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mayfly.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mayfly.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository[:tag][@digest]; a digest pins the image whatever the tag says. */}}
{{- define "mayfly.imageRef" -}}
{{- $ref := .repository }}
{{- if .tag }}{{ $ref = printf "%s:%s" $ref .tag }}{{ end }}
{{- if .digest }}{{ $ref = printf "%s@%s" $ref .digest }}{{ end }}
{{- $ref }}
{{- end }}

{{- define "mayfly.image" -}}
{{- $img := deepCopy .Values.image }}
{{- $_ := set $img "tag" (default .Chart.AppVersion .Values.image.tag) }}
{{- include "mayfly.imageRef" $img }}
{{- end }}

{{/* The port number from config.listen ("0.0.0.0:8443", "[::]:8443"). */}}
{{- define "mayfly.port" -}}
{{- regexReplaceAll "^.*:([0-9]+)$" .Values.config.listen "${1}" }}
{{- end }}

{{- define "mayfly.jwtIssuer" -}}
{{- if .Values.config.providers.jwt.issuer }}
{{- .Values.config.providers.jwt.issuer }}
{{- else }}
{{- printf "https://%s.%s.svc:%d" (include "mayfly.fullname" .) .Release.Namespace (int .Values.service.port) }}
{{- end }}
{{- end }}

{{/*
Where the chart mounts each file the broker config names. Kept in one place so the
rendered mayfly.toml and the volume mounts cannot drift apart.
*/}}
{{- define "mayfly.paths" -}}
configDir: /etc/mayfly
configFile: /etc/mayfly/mayfly.toml
policyDir: /etc/mayfly/policies
identityDir: /var/run/mayfly/identity
bundleDir: /var/run/mayfly/bundles
redisDir: /var/run/mayfly/redis
jwtDir: /var/run/mayfly/jwt
jwtKeysDir: /var/run/mayfly/jwt-keys
filesDir: /var/run/mayfly/files
vaultAuthDir: /var/run/mayfly/vault
vaultCaDir: /var/run/mayfly/vault-ca
dataDir: /var/lib/mayfly
workloadApiDir: /spiffe-workload-api
helperConfigDir: /etc/spiffe-helper
{{- end }}

{{/* True ("true") when more than one pod can run at once. */}}
{{- define "mayfly.multiReplica" -}}
{{- if .Values.autoscaling.enabled }}
{{- if gt (int .Values.autoscaling.maxReplicas) 1 }}true{{ end }}
{{- else if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{/*
TOML string: a JSON string literal is a valid TOML basic string (same escapes), so
toJson quotes any value safely, including paths and URLs with quotes or backslashes.
*/}}
{{- define "mayfly.tomlString" -}}
{{- toJson (toString .) }}
{{- end }}

{{/* A Mayfly duration ("250ms", "90s", "15m", "1h", "2d", bare seconds) in milliseconds. */}}
{{- define "mayfly.durationMs" -}}
{{- $s := toString . }}
{{- $n := regexReplaceAll "^([0-9]+).*$" $s "${1}" | int64 }}
{{- $unit := regexReplaceAll "^[0-9]+" $s "" }}
{{- $per := dict "ms" 1 "" 1000 "s" 1000 "m" 60000 "h" 3600000 "d" 86400000 }}
{{- mul $n (get $per $unit) }}
{{- end }}

{{/* The port of an http(s) URL: the one it names, else 443 (https) or 80 (http). */}}
{{- define "mayfly.urlPort" -}}
{{- $rest := regexReplaceAll "^[a-zA-Z][a-zA-Z0-9+.-]*://" . "" }}
{{- $hostport := regexReplaceAll "[/?#].*$" $rest "" }}
{{- $port := regexFind ":[0-9]+$" (regexReplaceAll "^\\[[^\\]]*\\]" $hostport "") | trimPrefix ":" }}
{{- if $port }}{{ $port }}{{ else if hasPrefix "http://" . }}80{{ else }}443{{ end }}
{{- end }}

{{/* True ("true") when the broker talks to the SPIFFE Workload API itself ([workload_api]). */}}
{{- define "mayfly.workloadApi" -}}
{{- if .Values.config.workload_api.enabled }}true{{ end }}
{{- end }}

{{/*
Every file the broker config names that comes from a ConfigMap or Secret key, as a
YAML list of {key, volume, dir, file, from}: `key` is the mayfly.toml key, the file is
mounted at dir/file. The volume mounts (statefulset.yaml) and the paths written into
mayfly.toml (configmap.yaml) both come from this one list, so they cannot drift apart.
*/}}
{{- define "mayfly.files" -}}
{{- $p := include "mayfly.paths" . | fromYaml }}
{{- $c := .Values.config }}
{{- $out := list }}
{{- range $i, $td := $c.trust_domains }}
{{- with $td.bundle }}
{{- $out = append $out (dict "key" (printf "trust_domains[%d].bundle_file" $i) "volume" (printf "bundle-%d" $i) "dir" (printf "%s/%s" $p.bundleDir $td.name) "file" "bundle.pem" "from" .) }}
{{- end }}
{{- with $td.endpoint_ca }}
{{- $out = append $out (dict "key" (printf "trust_domains[%d].endpoint_ca_file" $i) "volume" (printf "td-%d-endpoint-ca" $i) "dir" (printf "%s/td-%d-endpoint-ca" $p.filesDir $i) "file" "ca.pem" "from" .) }}
{{- end }}
{{- end }}
{{- range $i, $j := $c.jwt_svid }}
{{- with $j.bundle }}
{{- $out = append $out (dict "key" (printf "jwt_svid[%d].bundle_file" $i) "volume" (printf "jwt-svid-%d-bundle" $i) "dir" (printf "%s/jwt-svid-%d-bundle" $p.filesDir $i) "file" "bundle.json" "from" .) }}
{{- end }}
{{- with $j.endpoint_ca }}
{{- $out = append $out (dict "key" (printf "jwt_svid[%d].endpoint_ca_file" $i) "volume" (printf "jwt-svid-%d-endpoint-ca" $i) "dir" (printf "%s/jwt-svid-%d-endpoint-ca" $p.filesDir $i) "file" "ca.pem" "from" .) }}
{{- end }}
{{- end }}
{{- range $i, $o := $c.oidc_issuers }}
{{- with $o.jwks }}
{{- $out = append $out (dict "key" (printf "oidc_issuers[%d].jwks_file" $i) "volume" (printf "oidc-%d-jwks" $i) "dir" (printf "%s/oidc-%d-jwks" $p.filesDir $i) "file" "jwks.json" "from" .) }}
{{- end }}
{{- end }}
{{- with $c.webhook }}
{{- if .url }}
{{- $out = append $out (dict "key" "webhook.secret_file" "volume" "webhook-secret" "dir" (printf "%s/webhook-secret" $p.filesDir) "file" "secret" "from" (dict "secret" .secret)) }}
{{- with .ca }}
{{- $out = append $out (dict "key" "webhook.ca_file" "volume" "webhook-ca" "dir" (printf "%s/webhook-ca" $p.filesDir) "file" "ca.pem" "from" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if eq $c.store.kind "redis" }}
{{- with $c.store.tls_ca }}
{{- $out = append $out (dict "key" "store.tls_ca_file" "volume" "redis-ca" "dir" (printf "%s/redis-ca" $p.filesDir) "file" "ca.pem" "from" .) }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* The in-pod path of the file with mayfly.toml key `key` (see mayfly.files). */}}
{{- define "mayfly.filePath" -}}
{{- $key := index . 1 }}
{{- range include "mayfly.files" (index . 0) | fromYamlArray }}
{{- if eq .key $key }}{{ printf "%s/%s" .dir .file }}{{ end }}
{{- end }}
{{- end }}

{{/*
TOML `key = value` lines for the scalar and list-of-scalar entries of a values map
(dict), skipping `skip` keys and unset (null) values. JSON strings, numbers, booleans
and arrays of them are valid TOML.
*/}}
{{- define "mayfly.tomlScalars" -}}
{{- $m := index . 0 }}
{{- $skip := index . 1 }}
{{- range $k := keys $m | sortAlpha }}
{{- $val := get $m $k }}
{{- if and (not (has $k $skip)) (not (kindIs "invalid" $val)) (not (kindIs "map" $val)) }}
{{- if and (kindIs "float64" $val) (eq (float64 (int64 $val)) $val) }}
{{ $k }} = {{ int64 $val }}
{{- else }}
{{ $k }} = {{ toJson $val }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
