{{/* Resource names: RELEASE-smallfirst, or the release name when it holds the chart name. */}}
{{- define "smallfirst.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "smallfirst.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource; call with (dict "root" $ "component" "gateway"). */}}
{{- define "smallfirst.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{ include "smallfirst.selectorLabels" . }}
{{- end -}}

{{- define "smallfirst.selectorLabels" -}}
app.kubernetes.io/name: {{ include "smallfirst.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "smallfirst.image" -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- end -}}

{{- define "smallfirst.gatewayServiceAccount" -}}
{{- if .Values.gateway.serviceAccount.create -}}
{{- default (printf "%s-gateway" (include "smallfirst.fullname" .)) .Values.gateway.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.gateway.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The small model the gateway calls: the chart's vLLM Service, or the external endpoint. */}}
{{- define "smallfirst.smallApiBase" -}}
{{- if .Values.vllm.enabled -}}
{{- printf "http://%s-vllm:%d/v1" (include "smallfirst.fullname" .) (int .Values.vllm.port) -}}
{{- else -}}
{{- required "vllm.external.apiBase is required when vllm.enabled is false" .Values.vllm.external.apiBase -}}
{{- end -}}
{{- end -}}

{{- define "smallfirst.smallModel" -}}
{{- if .Values.vllm.enabled -}}
{{- printf "hosted_vllm/%s" .Values.vllm.servedModelName -}}
{{- else -}}
{{- printf "hosted_vllm/%s" (required "vllm.external.model is required when vllm.enabled is false" .Values.vllm.external.model) -}}
{{- end -}}
{{- end -}}

{{- define "smallfirst.keysSecret" -}}
{{- default (printf "%s-keys" (include "smallfirst.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "smallfirst.policiesConfigMap" -}}
{{- default (printf "%s-policies" (include "smallfirst.fullname" .)) .Values.policies.existingConfigMap -}}
{{- end -}}

{{/* Settings the chart passes as SMALLFIRST_* variables, which would silently win over the
same keys in gateway.config: refuse them there and name the value to use instead. */}}
{{- define "smallfirst.checkGatewayConfig" -}}
{{- $wired := dict "host" "nothing (the pod listens on all its addresses)" "port" "gateway.port" "workers" "gateway.workers" "policies" "policies" "default_policy" "policies.default" "api_keys_file" "auth" "small_model" "vllm" "small_api_base" "vllm" "log_level" "gateway.logLevel" "watch_policies" "policies" -}}
{{- if or .Values.redis.enabled .Values.redis.external.existingSecret -}}
{{- $_ := set $wired "redis_url" "redis" -}}
{{- end -}}
{{- if .Values.frontier.model -}}
{{- $_ := set $wired "frontier_model" "frontier.model" -}}
{{- end -}}
{{- if or .Values.frontier.apiKey.existingSecret .Values.frontier.apiKey.value -}}
{{- $_ := set $wired "frontier_api_key" "frontier.apiKey" -}}
{{- end -}}
{{- range $key, $use := $wired -}}
{{- if hasKey $.Values.gateway.config $key -}}
{{- fail (printf "gateway.config.%s is set by the chart; use %s instead" $key $use) -}}
{{- end -}}
{{- end -}}
{{- end -}}
