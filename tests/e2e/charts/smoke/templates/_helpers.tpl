{{- define "smoke.fullname" -}}
{{- printf "%s-smoke" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "smoke.labels" -}}
app.kubernetes.io/name: smoke
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "smoke.selectorLabels" -}}
app.kubernetes.io/name: smoke
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
