{{/* Names, labels and computed values shared by the templates. */}}

{{- define "fastapi-deploy.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fastapi-deploy.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fastapi-deploy.labels" -}}
app.kubernetes.io/name: {{ include "fastapi-deploy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "fastapi-deploy.selector" -}}
app.kubernetes.io/name: {{ include "fastapi-deploy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fastapi-deploy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fastapi-deploy.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fastapi-deploy.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "fastapi-deploy.appsNamespace" -}}
{{- default (printf "%s-apps" (default "default" .Release.Namespace)) .Values.apps.namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fastapi-deploy.leaseName" -}}
{{- default (printf "%s-leader" (include "fastapi-deploy.fullname" .)) .Values.leaderElection.leaseName -}}
{{- end -}}

{{- define "fastapi-deploy.secretName" -}}
{{- default (include "fastapi-deploy.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "fastapi-deploy.databaseSecret" -}}
{{- default (include "fastapi-deploy.fullname" .) .Values.database.existingSecret -}}
{{- end -}}

{{- define "fastapi-deploy.apiHost" -}}
{{- default (printf "api.%s" .Values.domain) .Values.ingress.apiHost -}}
{{- end -}}

{{/* A Fernet key: 32 random bytes, urlsafe base64; the one already in the release's Secret on upgrades. */}}
{{- define "fastapi-deploy.secretKey" -}}
{{- if .Values.secrets.secretKey -}}
{{- .Values.secrets.secretKey -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "fastapi-deploy.fullname" .) -}}
{{- if and $existing $existing.data (index $existing.data "FASTAPI_DEPLOY_SECRET_KEY") -}}
{{- index $existing.data "FASTAPI_DEPLOY_SECRET_KEY" | b64dec -}}
{{- else -}}
{{- randBytes 32 | b64enc | replace "+" "-" | replace "/" "_" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* What the routers present to the control plane: the value given, the one already in the release's
Secret on upgrades, or a new random one. */}}
{{- define "fastapi-deploy.routerToken" -}}
{{- if .Values.secrets.routerToken -}}
{{- .Values.secrets.routerToken -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "fastapi-deploy.fullname" .) -}}
{{- if and $existing $existing.data (index $existing.data "FASTAPI_DEPLOY_ROUTER_TOKEN") -}}
{{- index $existing.data "FASTAPI_DEPLOY_ROUTER_TOKEN" | b64dec -}}
{{- else -}}
{{- randAlphaNum 43 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Routers of their own (router.replicas > 0), or the one embedded in the leader. */}}
{{- define "fastapi-deploy.remoteRouters" -}}
{{- if gt (int .Values.router.replicas) 0 -}}true{{- end -}}
{{- end -}}

{{/* The pod security settings of every container the chart runs. */}}
{{- define "fastapi-deploy.podSecurity" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}
