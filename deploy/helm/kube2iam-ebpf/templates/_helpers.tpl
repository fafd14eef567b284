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
{{- if and .Values.sessionTags.scope (not (or .Values.sessionTags.clusterArn .Values.sessionTags.clusterName)) }}
{{- fail "sessionTags.scope needs the cluster for the eks-cluster-arn and eks-cluster-name tags: set sessionTags.clusterArn (arn:aws:eks:<region>:<account>:cluster/<name>)" }}
{{- end }}
{{- if not (has .Values.updateStrategy (list "RollingUpdate" "OnDelete")) }}
{{- fail (printf "updateStrategy %q: use RollingUpdate or OnDelete" .Values.updateStrategy) }}
{{- end }}
{{- if eq (toString .Values.prometheus.metricsPort) (toString .Values.host.port) }}
{{- fail (printf "prometheus.metricsPort %v is also host.port: /metrics, /healthz and /readyz need a port of their own (the metadata port is for pods, and every pod could read metrics there; kube2iam served them on it when metricsPort was unset); set prometheus.metricsPort to another port, e.g. 9181" .Values.prometheus.metricsPort) }}
{{- end }}
{{- if hasPrefix "jtblin/kube2iam" .Values.image.repository }}
{{- fail (printf "image.repository %s is kube2iam's image; set image.repository (and image.tag) to the image you built from deploy/Dockerfile (see README.md)" .Values.image.repository) }}
{{- end }}
{{- /* Flags the chart renders from values of its own. */}}
{{- $managed := dict
  "host-ip" "set host.ip"
  "app-port" "set host.port"
  "metrics-port" "set prometheus.metricsPort"
  "node" "the chart passes the pod's node name"
  "bpf-pin-path" "set bpf.pinPath"
  "cgroup-path" "set cgroup.path"
  "host-interface" "set host.interface"
  "packet-guard" "set packetGuard"
  "node-guard" "set nodeGuard"
  "egress-guard" "set egressGuard"
  "identity-attestation" "set identityAttestation"
  "host-network-pods" "set hostNetworkPods"
  "version" "it prints the version and exits: remove it"
  "session-tags" "set sessionTags.scope"
  "cluster-arn" "set sessionTags.clusterArn"
  "cluster-name" "set sessionTags.clusterName"
  "source-identity" "set sessionTags.sourceIdentity"
  "service-account-roles" "set serviceAccountRoles.enabled (it also grants the ServiceAccount watch)"
  "service-account-role-key" "set serviceAccountRoles.annotation"
}}
{{- /* kube2iam's flags: the table the agent compiles in, so both refuse the same ones. */}}
{{- $kube2iam := (.Files.Get "kube2iam-flags.json" | fromJson).flags }}
{{- range $key, $value := .Values.extraArgs }}
{{- if hasKey $managed $key }}
{{- fail (printf "extraArgs.%s: %s" $key (get $managed $key)) }}
{{- end }}
{{- $entry := get $kube2iam $key }}
{{- if $entry }}
{{- $off := or (eq (toString $value) "false") (eq (toString $value) "<nil>") }}
{{- if or (eq $entry.action "refuse") (and (eq $entry.action "false-only") (not $off)) }}
{{- fail (printf "extraArgs.%s: kube2iam's flag is not supported by kube2iam-ebpf: %s (see docs/migrating-from-kube2iam.md)" $key $entry.message) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
extraArgs as flags, in key order. kube2iam's flags go to the agent as they are: it takes them as
kube2iam-flags.json says (`--iam-external-id` is another name of `--iam-external-id-key`).
*/}}
{{- define "kube2iam-ebpf.extraArgs" -}}
{{- range $key, $value := .Values.extraArgs }}
{{- if or (eq (toString $value) "true") (eq (toString $value) "") }}
- --{{ $key }}
{{- else if and (ne (toString $value) "false") (ne (toString $value) "<nil>") }}
- {{ printf "--%s=%v" $key $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
livenessProbe, with the stable/kube2iam chart's `probe` (true/false, or its own timings) read
into it.
*/}}
{{- define "kube2iam-ebpf.livenessProbe" -}}
{{- $probe := deepCopy .Values.livenessProbe }}
{{- if kindIs "map" .Values.probe }}
{{- $probe = mergeOverwrite $probe .Values.probe }}
{{- else if kindIs "bool" .Values.probe }}
{{- $_ := set $probe "enabled" .Values.probe }}
{{- end }}
{{- toJson $probe }}
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
{{- /* With SYS_ADMIN, no_new_privs is no barrier, so it is not claimed (the API itself rejects
allowPrivilegeEscalation=false only with the literal CAP_SYS_ADMIN in capabilities.add). */}}
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
