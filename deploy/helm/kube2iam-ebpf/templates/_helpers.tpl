{{/* Names and labels. */}}

{{- define "kube2iam-ebpf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kube2iam-ebpf.fullname" -}}
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

{{- define "kube2iam-ebpf.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kube2iam-ebpf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kube2iam-ebpf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kube2iam-ebpf.labels" -}}
helm.sh/chart: {{ include "kube2iam-ebpf.chart" . }}
{{ include "kube2iam-ebpf.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kube2iam-ebpf.serviceAccountName" -}}
{{- if .Values.rbac.create }}
{{- include "kube2iam-ebpf.fullname" . }}
{{- else }}
{{- .Values.rbac.serviceAccountName }}
{{- end }}
{{- end }}

{{- define "kube2iam-ebpf.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "kube2iam-ebpf.awsSecretName" -}}
{{- default (include "kube2iam-ebpf.fullname" .) .Values.existingSecret }}
{{- end }}

{{/*
Values checks, run by the DaemonSet template: a kube2iam values file that uses something with no
counterpart here fails to render with what to do instead, rather than crash-looping on a node.
*/}}
{{- define "kube2iam-ebpf.validate" -}}
{{- if .Values.podSecurityPolicy.enabled }}
{{- fail "podSecurityPolicy.enabled: PodSecurityPolicy was removed in Kubernetes 1.25; label the release namespace for Pod Security admission instead (the agent needs the privileged level: hostNetwork, hostPath, capabilities)" }}
{{- end }}
{{- if and (not .Values.existingSecret) (or .Values.aws.access_key .Values.aws.secret_key) (not (and .Values.aws.access_key .Values.aws.secret_key)) }}
{{- fail "aws.access_key and aws.secret_key go together: set both, or neither (or existingSecret)" }}
{{- end }}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.bpf.hostPath)) .Values.bpf.pinPath) }}
{{- fail (printf "bpf.pinPath %s must be under bpf.hostPath %s, or the pins die with the container" .Values.bpf.pinPath .Values.bpf.hostPath) }}
{{- end }}
{{- if and (eq .Values.bpf.mountPropagation "Bidirectional") (not .Values.securityContext.privileged) }}
{{- fail "bpf.mountPropagation=Bidirectional needs securityContext.privileged=true (Kubernetes allows bidirectional propagation only in privileged containers)" }}
{{- end }}
{{- if not (has .Values.updateStrategy (list "RollingUpdate" "OnDelete")) }}
{{- fail (printf "updateStrategy %q: use RollingUpdate or OnDelete" .Values.updateStrategy) }}
{{- end }}
{{- $managed := dict
  "host-ip" "set host.ip"
  "app-port" "set host.port"
  "metrics-port" "set prometheus.metricsPort"
  "node" "the chart passes the pod's node name"
  "bpf-pin-path" "set bpf.pinPath"
  "cgroup-path" "set cgroup.path"
  "host-interface" "set host.interface"
  "packet-guard" "set packetGuard"
  "egress-guard" "set egressGuard"
}}
{{- $unsupported := dict
  "iptables" "interception is done by eBPF programs in the kernel, there is no iptables rule: remove it"
  "use-regional-sts-endpoint" "the regional STS endpoint is always used: remove it (aws.region or extraArgs.region picks the region)"
  "insecure" "the API server's certificate is always verified: remove it"
  "api-token" "use extraArgs.kubeconfig, or the in-cluster ServiceAccount the chart creates"
  "backoff-max-interval" "a request from a pod the agent does not know yet waits for the pod watch instead of polling: use extraArgs.pod-wait (default 1s)"
  "backoff-max-elapsed-time" "a request from a pod the agent does not know yet waits for the pod watch instead of polling: use extraArgs.pod-wait (default 1s)"
  "cache-resync-period" "the watches relist after errors without dropping valid entries; there is no periodic resync: remove it"
  "resolve-duplicate-cache-ips" "an IP always belongs to the newest live pod, without asking the API server: remove it"
  "auto-discover-default-role" "not supported, because it hands every unannotated pod the node's own role: name a role with extraArgs.default-role"
  "assume-role-arn" "not supported: the agent's own credentials come from the standard AWS chain (instance profile, existingSecret, AWS_* variables in extraEnv)"
  "cache-sync-attempts" "the agent reports not ready (/readyz) until its watches have synced: remove it"
  "healthcheck-interval" "the upstream check behind /readyz is built in: remove it"
  "iam-role-session-name-key" "per-pod session names come from extraArgs.session-per-pod (namespace.pod), not an annotation"
  "iam-enable-pod-identity-tags" "session tags are not supported: remove it"
  "eks-cluster-arn" "session tags are not supported: remove it"
  "eks-cluster-name" "session tags are not supported: remove it"
  "verbose" "set verbose: true (or extraArgs.log-level: debug)"
  "version" "it prints the version and exits: remove it"
}}
{{- range $key, $value := .Values.extraArgs }}
{{- if hasKey $managed $key }}
{{- fail (printf "extraArgs.%s: %s" $key (get $managed $key)) }}
{{- end }}
{{- if hasKey $unsupported $key }}
{{- fail (printf "extraArgs.%s is a kube2iam flag with no counterpart: %s (see docs/migrating-from-kube2iam.md)" $key (get $unsupported $key)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
extraArgs as flags, in key order. kube2iam's `--iam-external-id` (the external-ID annotation key)
is the agent's `--iam-external-id-key`.
*/}}
{{- define "kube2iam-ebpf.extraArgs" -}}
{{- range $key, $value := .Values.extraArgs }}
{{- $flag := ternary "iam-external-id-key" $key (eq $key "iam-external-id") }}
{{- if or (eq (toString $value) "true") (eq (toString $value) "") }}
- --{{ $flag }}
{{- else if and (ne (toString $value) "false") (ne (toString $value) "<nil>") }}
- {{ printf "--%s=%v" $flag $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The container securityContext. */}}
{{- define "kube2iam-ebpf.securityContext" -}}
{{- $caps := list }}
{{- range .Values.securityContext.capabilities }}
{{- $caps = append $caps (trimPrefix "CAP_" (upper .)) }}
{{- end }}
runAsUser: 0
runAsGroup: 0
readOnlyRootFilesystem: {{ .Values.securityContext.readOnlyRootFilesystem }}
{{- if .Values.securityContext.privileged }}
privileged: true
{{- else }}
{{- /* The API rejects allowPrivilegeEscalation=false together with CAP_SYS_ADMIN. */}}
allowPrivilegeEscalation: {{ has "SYS_ADMIN" $caps }}
capabilities:
  drop:
    - ALL
  {{- with $caps }}
  add:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
seccompProfile:
  type: {{ .Values.securityContext.seccompProfile }}
{{- end }}
