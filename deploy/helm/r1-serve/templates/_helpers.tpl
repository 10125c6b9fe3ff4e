{{/* Name of every object of the release. */}}
{{- define "r1.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "r1.name" -}}
{{- default "r1-serve" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The row of .Values.targets for .Values.target; fails on an unknown target. */}}
{{- define "r1.targetRow" -}}
{{- $row := get .Values.targets .Values.target -}}
{{- if not $row -}}
{{- fail (printf "target %q has no row in .Values.targets (known: %s)" .Values.target (keys .Values.targets | sortAlpha | join ", ")) -}}
{{- end -}}
{{- toYaml $row -}}
{{- end -}}

{{- define "r1.isGpu" -}}
{{- if ne .Values.target "cpu" -}}true{{- end -}}
{{- end -}}

{{- define "r1.selectorLabels" -}}
app.kubernetes.io/name: {{ include "r1.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "r1.labels" -}}
{{ include "r1.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
r1.dev/target: {{ .Values.target }}
{{- end -}}

{{- define "r1.image" -}}
{{- $flavour := ternary "gpu" "cpu" (eq (include "r1.isGpu" .) "true") -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion $flavour) .Values.image.tag) -}}
{{- end -}}

{{/* The model volume mount: read-write for the engine build, read-only for the server. */}}
{{- define "r1.modelMount" -}}
- name: model
  mountPath: /models/model
  {{- with .root.Values.model.subPath }}
  subPath: {{ . }}
  {{- end }}
  readOnly: {{ .readOnly }}
{{- end -}}

{{/* The engine build: `r1-export build` under the build lock (see deploy/README.md). */}}
{{- define "r1.buildArgs" -}}
- r1-export
- build
- /models/model
- --target
- {{ .Values.target }}
{{- range .Values.engineBuild.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Resources: .Values.resources, or the target's row, plus the target's GPUs. */}}
{{- define "r1.resources" -}}
{{- $row := include "r1.targetRow" . | fromYaml -}}
{{- $res := deepCopy (default $row.resources .Values.resources) -}}
{{- if gt (int $row.gpus) 0 -}}
{{- $limits := default (dict) $res.limits -}}
{{- $_ := set $limits "nvidia.com/gpu" (int $row.gpus) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* Scheduling shared by the serving pods and the build Job: GPU product affinity and toleration. */}}
{{- define "r1.scheduling" -}}
{{- $row := include "r1.targetRow" . | fromYaml -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .Values.affinity }}
affinity:
  {{- toYaml .Values.affinity | nindent 2 }}
{{- else if $row.gpuProducts }}
affinity:
  nodeAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      nodeSelectorTerms:
        - matchExpressions:
            - key: nvidia.com/gpu.product
              operator: In
              values:
                {{- toYaml $row.gpuProducts | nindent 16 }}
{{- end }}
{{- if or (include "r1.isGpu" .) .Values.tolerations }}
tolerations:
  {{- if include "r1.isGpu" . }}
  - key: nvidia.com/gpu
    operator: Exists
    effect: NoSchedule
  {{- end }}
  {{- with .Values.tolerations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Pod-level security: the images run as uid 10001; fsGroup makes the volume writable for the engine build. */}}
{{- define "r1.podSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  fsGroupChangePolicy: OnRootMismatch
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "r1.containerSecurityContext" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end -}}
