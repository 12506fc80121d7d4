{{/*
Names the binary fixes (see charts/trellis/README section in the top-level README):
the namespace, the ServiceAccount (part of the control plane's SPIFFE id), the
ConfigMap, the Lease and the webhook Service (the certificate's DNS name).
*/}}
{{- define "trellis.namespace" -}}trellis-system{{- end -}}
{{- define "trellis.serviceAccount" -}}trellis-control-plane{{- end -}}

{{- define "trellis.checkNamespace" -}}
{{- if ne .Release.Namespace (include "trellis.namespace" .) -}}
{{- fail (printf "install this chart into the namespace trellis-system (got %q): the control plane's identity and webhook name are fixed" .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{- define "trellis.chart" -}}
{{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "trellis.labels" -}}
helm.sh/chart: {{ include "trellis.chart" . }}
app.kubernetes.io/name: trellis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: trellis
app.kubernetes.io/managed-by: {{ .Release.Service }}
trellis.dev/profile: {{ .Values.profile }}
{{- end -}}

{{/* Selector of the control plane pods (immutable: name, instance, component). */}}
{{- define "trellis.selectorLabels" -}}
app.kubernetes.io/name: trellis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end -}}

{{/* registry/repository[:tag][@digest]; the tag defaults to appVersion. */}}
{{- define "trellis.image" -}}
{{- $img := .image -}}
{{- $ref := printf "%s/%s" $img.registry $img.repository -}}
{{- $tag := default .root.Chart.AppVersion $img.tag -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $ref $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $ref $tag -}}
{{- end -}}
{{- end -}}
