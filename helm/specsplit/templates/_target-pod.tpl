{{/* Pod template of the target tier, shared by deployment-target.yaml and statefulset-target.yaml. */}}
{{- define "specsplit.target.podTemplate" -}}
{{- $t := .Values.target }}
{{- $tp := int $t.tensorParallelSize }}
{{- $tls := .Values.tls.enabled }}
{{- $probePort := ternary .Values.tls.probePort $t.grpcPort $tls }}
metadata:
  {{- include "specsplit.podMetadata" (dict "root" . "component" "target" "values" $t) | nindent 2 }}
spec:
  {{- with $t.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  automountServiceAccountToken: false
  {{- include "specsplit.podCommon" (dict "root" . "values" $t) | trim | nindent 2 }}
  {{- with include "specsplit.pullInitContainers" (dict "root" . "models" (list (include "specsplit.modelName" .))) | trim }}
  initContainers:
    {{- . | trim | nindent 4 }}
  {{- end }}
  containers:
    - name: target
      image: {{ include "specsplit.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: ["specsplit"]
      args:
        - target
        - {{ include "specsplit.modelName" . | quote }}
        - --grpc-port={{ int $t.grpcPort }}
        - --metrics-port={{ int $t.metricsPort }}
        - --tensor-parallel-size={{ $tp }}
        - --dtype={{ $t.dtype }}
        {{- if not (kindIs "invalid" $t.maxModelLen) }}
        - --max-model-len={{ int $t.maxModelLen }}
        {{- end }}
        - --gpu-memory-utilization={{ $t.gpuMemoryUtilization }}
        - --shutdown-grace-seconds={{ int $t.shutdownGraceSeconds }}
        {{- with include "specsplit.tierTlsArgs" . | trim }}{{ . | nindent 8 }}{{ end }}
        {{- if and .Values.tls.enabled .Values.draft.enabled }}
        # direct rounds: this tier dials the draft replicas (by pod IP) with its own certificate
        - --draft-tls-ca=/etc/specsplit/tls/ca.crt
        - --draft-tls-cert=/etc/specsplit/tls/tls.crt
        - --draft-tls-key=/etc/specsplit/tls/tls.key
        - --draft-tls-server-name={{ include "specsplit.componentName" (dict "root" . "component" "draft") }}.{{ .Release.Namespace }}.svc
        {{- end }}
        {{- with $t.extraArgs }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      env:
        {{- include "specsplit.commonEnv" . | nindent 8 }}
        {{- with $t.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ int $t.grpcPort }}
          protocol: TCP
        - name: metrics
          containerPort: {{ int $t.metricsPort }}
          protocol: TCP
        {{- if $tls }}
        - name: health
          containerPort: {{ int .Values.tls.probePort }}
          protocol: TCP
        {{- end }}
      startupProbe:
        {{- include "specsplit.grpcProbe" (dict "port" $probePort "probe" $t.startupProbe) | nindent 8 }}
      readinessProbe:
        {{- include "specsplit.grpcProbe" (dict "port" $probePort "probe" $t.readinessProbe) | nindent 8 }}
      livenessProbe:
        {{- include "specsplit.grpcProbe" (dict "port" $probePort "probe" $t.livenessProbe) | nindent 8 }}
      {{- with $t.lifecycle }}
      lifecycle:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- include "specsplit.resources" (dict "resources" $t.resources "gpus" $tp "name" .Values.gpuResourceName) | nindent 8 }}
      volumeMounts:
        {{- include "specsplit.volumeMounts" (dict "root" . "shm" $t.shmSizeLimit) | nindent 8 }}
        {{- if $tls }}
        {{- include "specsplit.secretMount" (dict "name" "tls" "path" "/etc/specsplit/tls") | nindent 8 }}
        {{- end }}
  volumes:
    {{- include "specsplit.volumes" (dict "root" . "shm" $t.shmSizeLimit) | trim | nindent 4 }}
    {{- if $tls }}
    {{- include "specsplit.secretVolume" (dict "name" "tls" "secret" (include "specsplit.tlsSecretName" (dict "root" . "component" "target"))) | nindent 4 }}
    {{- end }}
{{- end }}
