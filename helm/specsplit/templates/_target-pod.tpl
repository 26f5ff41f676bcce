{{/* Pod template of the target tier, shared by deployment-target.yaml and statefulset-target.yaml. */}}
{{- define "specsplit.target.podTemplate" -}}
{{- $t := .Values.target }}
{{- $tp := int $t.tensorParallelSize }}
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
      startupProbe:
        {{- include "specsplit.grpcProbe" (dict "port" $t.grpcPort "probe" $t.startupProbe) | nindent 8 }}
      readinessProbe:
        {{- include "specsplit.grpcProbe" (dict "port" $t.grpcPort "probe" $t.readinessProbe) | nindent 8 }}
      livenessProbe:
        {{- include "specsplit.grpcProbe" (dict "port" $t.grpcPort "probe" $t.livenessProbe) | nindent 8 }}
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
  volumes:
    {{- include "specsplit.volumes" (dict "root" . "shm" $t.shmSizeLimit) | trim | nindent 4 }}
{{- end }}
