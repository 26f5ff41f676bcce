{{/*
Helpers shared by every template. Component helpers take (dict "root" $ "component" NAME).
Helm hands numbers from values files over as float64: every number printed goes through `int`.
*/}}

{{- define "specsplit.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "specsplit.fullname" -}}
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

{{- define "specsplit.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of one component's resources; 45 + "-target" stays within a StatefulSet's 52. */}}
{{- define "specsplit.componentName" -}}
{{- printf "%s-%s" (include "specsplit.fullname" .root | trunc 45 | trimSuffix "-") .component }}
{{- end }}

{{- define "specsplit.selectorLabels" -}}
app.kubernetes.io/name: {{ include "specsplit.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "specsplit.labels" -}}
helm.sh/chart: {{ include "specsplit.chart" .root }}
{{ include "specsplit.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: specsplit
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "specsplit.image" -}}
{{- $repo := required "image.repository is required: the image that runs the specsplit CLI" .Values.image.repository }}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "specsplit.modelName" -}}
{{- required "model.name is required: a catalogue name (e.g. qwen2.5-coder-1.5b) or an absolute path under model.mountPath" .Values.model.name }}
{{- end }}

{{- define "specsplit.gatewayServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "specsplit.componentName" (dict "root" . "component" "gateway")) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* GPUs per draft pod: none for ngram, draft_tensor_parallel_size (default 1) otherwise. */}}
{{- define "specsplit.draftGpus" -}}
{{- $c := .Values.speculativeConfig }}
{{- if eq $c.method "ngram" }}0{{ else if has $c.method (list "eagle" "eagle3") }}1{{ else }}{{ int (default 1 $c.draft_tensor_parallel_size) }}{{ end }}
{{- end }}

{{/* The --speculative-config JSON, with only the keys that apply to the method. */}}
{{- define "specsplit.speculativeConfig" -}}
{{- $c := .Values.speculativeConfig }}
{{- $out := dict "method" $c.method }}
{{- $keys := list "num_speculative_tokens" }}
{{- if eq $c.method "ngram" }}
{{- $keys = concat $keys (list "prompt_lookup_max" "prompt_lookup_min") }}
{{- else if has $c.method (list "eagle" "eagle3") }}
{{- $_ := required (printf "speculativeConfig.model is required for method %s: the head's folder in the model volume or its hub id" $c.method) $c.model }}
{{- if not (or (hasPrefix "/" $c.model) (regexMatch "^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$" $c.model)) }}
{{- fail (printf "speculativeConfig.model for method %s must be an absolute path inside the model volume (%s/...) or a hub id (org/name): heads are not in the catalogue" $c.method .Values.model.mountPath) }}
{{- end }}
{{- $keys = append $keys "model" }}
{{- else }}
{{- $_ := required "speculativeConfig.model is required for method draft_model: the draft model's catalogue name or path" $c.model }}
{{- $keys = concat $keys (list "model" "draft_tensor_parallel_size") }}
{{- end }}
{{- range $keys }}
{{- $v := get $c . }}
{{- if not (kindIs "invalid" $v) }}
{{- if kindIs "float64" $v }}{{ $v = int $v }}{{ end }}
{{- $_ := set $out . $v }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* Resources with the GPU count forced in: (dict "resources" R "gpus" N "name" RESOURCE). */}}
{{- define "specsplit.resources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- if gt (int .gpus) 0 }}
{{- $gpu := dict .name (int .gpus) }}
{{- $_ := set $res "limits" (merge (deepCopy $gpu) (default dict $res.limits)) }}
{{- $_ := set $res "requests" (merge (deepCopy $gpu) (default dict $res.requests)) }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* A native gRPC probe on grpc.health.v1 (service ""): (dict "port" P "probe" TIMINGS). */}}
{{- define "specsplit.grpcProbe" -}}
grpc:
  port: {{ int .port }}
{{- with .probe }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Environment every server container shares. */}}
{{- define "specsplit.commonEnv" -}}
- name: SPECSPLIT_CACHE
  value: {{ .Values.model.mountPath | quote }}
- name: HOME
  value: /tmp
{{- end }}

{{- define "specsplit.speculativeConfigEnv" -}}
- name: SPECSPLIT_SPECULATIVE_CONFIG
  value: {{ include "specsplit.speculativeConfig" . | quote }}
{{- end }}

{{/* "true" when the gateway has draft replicas to speculate with; else it decodes plainly. */}}
{{- define "specsplit.gatewayHasDrafts" -}}
{{- $d := .Values.gateway.discovery }}
{{- if eq $d.mode "static" }}{{ if $d.draftAddresses }}true{{ end }}
{{- else if .Values.draft.enabled }}true{{ end }}
{{- end }}

{{/* Volumes: the model store, a writable /tmp and, with "shm", a memory-backed /dev/shm. */}}
{{- define "specsplit.volumes" -}}
{{- $v := .root.Values.model }}
- name: models
{{- if $v.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ $v.existingClaim }}
{{- else if $v.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "specsplit.fullname" .root }}-models
{{- else if $v.volume }}
  {{- toYaml $v.volume | nindent 2 }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: tmp
  emptyDir: {}
{{- if .shm }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
{{- end }}
{{- end }}

{{- define "specsplit.volumeMounts" -}}
- name: models
  mountPath: {{ .root.Values.model.mountPath }}
  readOnly: {{ .root.Values.model.readOnly }}
- name: tmp
  mountPath: /tmp
{{- if .shm }}
- name: shm
  mountPath: /dev/shm
{{- end }}
{{- end }}

{{/* One init container per catalogue model: `specsplit models pull NAME`. (dict "root" $ "models" LIST) */}}
{{- define "specsplit.pullInitContainers" -}}
{{- $root := .root }}
{{- if $root.Values.model.download.enabled }}
{{- $pulls := list }}
{{- range .models }}{{ $pulls = append $pulls (list "models" "pull" .) }}{{ end }}
{{- range .heads }}{{ $pulls = append $pulls (list "models" "pull" "--head" .) }}{{ end }}
{{- range $i, $args := $pulls }}
{{- $name := last $args }}
{{- if and $name (not (hasPrefix "/" $name)) }}
- name: pull-model-{{ $i }}
  image: {{ include "specsplit.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: ["specsplit"]
  args: {{ toJson $args }}
  env:
    - name: SPECSPLIT_CACHE
      value: {{ $root.Values.model.mountPath | quote }}
    - name: HOME
      value: /tmp
    {{- with $root.Values.model.download.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $root.Values.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.model.download.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: models
      mountPath: {{ $root.Values.model.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Pod-level settings every tier shares: (dict "root" $ "values" COMPONENT_VALUES). */}}
{{- define "specsplit.podCommon" -}}
{{- $v := .values }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
terminationGracePeriodSeconds: {{ int $v.terminationGracePeriodSeconds }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod template labels and annotations: (dict "root" $ "component" NAME "values" V). */}}
{{- define "specsplit.podMetadata" -}}
labels:
  {{- include "specsplit.selectorLabels" . | nindent 2 }}
  {{- with .values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* "N replica(s)", or "HPA-managed replicas" when the count is left out. */}}
{{- define "specsplit.replicasText" -}}
{{- if kindIs "invalid" . }}HPA-managed replicas{{ else }}{{ int . }} replica(s){{ end }}
{{- end }}

{{/* PodDisruptionBudget spec fields from a component's podDisruptionBudget values. */}}
{{- define "specsplit.pdbSpec" -}}
{{- if not (kindIs "invalid" .minAvailable) }}
minAvailable: {{ include "specsplit.intOrString" .minAvailable }}
{{- else }}
maxUnavailable: {{ include "specsplit.intOrString" .maxUnavailable }}
{{- end }}
{{- end }}

{{/* An IntOrString value: numbers as integers, strings (percentages) quoted. */}}
{{- define "specsplit.intOrString" -}}
{{- if kindIs "string" . }}{{ quote . }}{{ else }}{{ int . }}{{ end }}
{{- end }}

{{/* Checks the schema cannot express; fails the render with a message that names the keys. */}}
{{- define "specsplit.validate" -}}
{{- range $c := list "gateway" "draft" "target" }}
{{- $v := get $.Values $c }}
{{- if and $v.enabled (le (int $v.terminationGracePeriodSeconds) (int $v.shutdownGraceSeconds)) }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must exceed %s.shutdownGraceSeconds (%d) so that a draining server is not killed mid-request" $c (int $v.terminationGracePeriodSeconds) $c (int $v.shutdownGraceSeconds)) }}
{{- end }}
{{- end }}
{{- $mode := .Values.gateway.discovery.mode }}
{{- if and .Values.gateway.enabled (eq $mode "static") (not .Values.gateway.discovery.targetAddresses) }}
{{- fail "gateway.discovery.mode=static needs gateway.discovery.targetAddresses (host:port list); use mode kubernetes or dns to find the chart's own replicas" }}
{{- end }}
{{- if and .Values.gateway.enabled (not .Values.target.enabled) (ne $mode "static") }}
{{- fail "target.enabled=false leaves the gateway without a target tier; enable it or use gateway.discovery.mode=static" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.issuerRef.name) }}
{{- fail "tls.enabled=true needs tls.issuerRef.name: the cert-manager Issuer or ClusterIssuer that signs the tier and gateway certificates" }}
{{- end }}
{{- if and .Values.gateway.enabled .Values.gateway.apiKeys.enabled (not .Values.gateway.apiKeys.existingSecret) }}
{{- fail "gateway.apiKeys.enabled=true needs gateway.apiKeys.existingSecret: a Secret whose key gateway.apiKeys.secretKey holds the key file" }}
{{- end }}
{{- end }}

{{/* Server flags of a tier with tls.enabled: mutual TLS from its cert-manager Secret, and a
plaintext health-only port for the kubelet's probes (they cannot speak TLS). */}}
{{- define "specsplit.tierTlsArgs" -}}
{{- if .Values.tls.enabled }}
- --tls-cert=/etc/specsplit/tls/tls.crt
- --tls-key=/etc/specsplit/tls/tls.key
- --tls-client-ca=/etc/specsplit/tls/ca.crt
- --health-port={{ int .Values.tls.probePort }}
{{- end }}
{{- end }}

{{/* Name of the Secret cert-manager fills for a component: (dict "root" $ "component" NAME). */}}
{{- define "specsplit.tlsSecretName" -}}
{{- printf "%s-tls" (include "specsplit.componentName" .) }}
{{- end }}

{{/* A read-only Secret volume and its mount: (dict "name" N "secret" S "path" P). */}}
{{- define "specsplit.secretVolume" -}}
- name: {{ .name }}
  secret:
    secretName: {{ .secret }}
    defaultMode: 0440
{{- end }}

{{- define "specsplit.secretMount" -}}
- name: {{ .name }}
  mountPath: {{ .path }}
  readOnly: true
{{- end }}

{{/* Certificate spec fields every certificate shares: (the tls values). */}}
{{- define "specsplit.certificateCommon" -}}
duration: {{ .duration }}
renewBefore: {{ .renewBefore }}
privateKey:
  algorithm: ECDSA
  size: 256
  rotationPolicy: Always
issuerRef:
  name: {{ .issuerRef.name }}
  kind: {{ .issuerRef.kind }}
  group: {{ .issuerRef.group | default "cert-manager.io" }}
{{- end }}
