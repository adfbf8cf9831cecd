{{- define "longtake.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "longtake.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "longtake.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "longtake.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* etcd endpoints, comma-separated: the given ones, or the chart's own etcd. */}}
{{- define "longtake.etcd" -}}
{{- if .Values.etcd.endpoints -}}
{{ join "," .Values.etcd.endpoints }}
{{- else -}}
{{ include "longtake.fullname" . }}-etcd:2379
{{- end -}}
{{- end -}}

{{/* The writable scratch and cache every longtake container gets (the root filesystem is read-only). */}}
{{- define "longtake.scratch" -}}
- name: XDG_CACHE_HOME
  value: /cache
- name: TMPDIR
  value: /tmp
{{- end -}}

{{- define "longtake.s3env" -}}
- name: AWS_REGION
  value: {{ .Values.store.region | quote }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ .Values.store.credentialsSecret }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ .Values.store.credentialsSecret }}, key: AWS_SECRET_ACCESS_KEY}
{{- if .Values.store.endpoint }}
- name: LONGTAKE_S3_ENDPOINT
  value: {{ .Values.store.endpoint | quote }}
{{- end }}
{{- end -}}

{{- define "longtake.mounts" -}}
- {name: cache, mountPath: /cache}
- {name: tmp, mountPath: /tmp}
{{- if .Values.models.enabled }}
- {name: models, mountPath: {{ .Values.models.mountPath }}, readOnly: true}
{{- end }}
{{- if .Values.access.tls.enabled }}
- {name: tls, mountPath: /etc/longtake/tls, readOnly: true}
{{- end }}
{{- end -}}

{{- define "longtake.volumes" -}}
- name: cache
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- if .Values.models.enabled }}
- name: models
  persistentVolumeClaim: {claimName: {{ .Values.models.persistentVolumeClaim }}, readOnly: true}
{{- end }}
{{- if .Values.access.tls.enabled }}
- name: tls
  secret: {secretName: {{ .Values.access.tls.secret }}}
{{- end }}
{{- end -}}
