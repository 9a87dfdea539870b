{{/* Names and labels. */}}
{{- define "token-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "token-broker.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "token-broker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "token-broker.labels" -}}
helm.sh/chart: {{ include "token-broker.chart" . }}
app.kubernetes.io/name: {{ include "token-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The broker pods (not the test pod): Deployment, Service, PDB, NetworkPolicy. */}}
{{- define "token-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "token-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: broker
{{- end -}}

{{- define "token-broker.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "token-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end -}}

{{- define "token-broker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "token-broker.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "token-broker.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "token-broker.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "token-broker.fullname" .)) .Values.tls.secretName -}}
{{- end -}}

{{- define "token-broker.clientCAEnabled" -}}
{{- if or .Values.tls.clientCA.secretName .Values.tls.clientCA.configMapName -}}true{{- end -}}
{{- end -}}

{{/* Where files are mounted in the broker container. */}}
{{- define "token-broker.configDir" -}}/etc/token-broker{{- end -}}
{{- define "token-broker.secretsDir" -}}/var/run/secrets/token-broker{{- end -}}

{{/* The port of a host:port address (rateLimit.redis.address). */}}
{{- define "token-broker.addressPort" -}}
{{- $port := regexFind "[0-9]+$" . -}}
{{- if not (regexMatch "^.+:[0-9]+$" .) -}}
{{- fail (printf "token-broker: %q is not host:port" .) -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{/*
The broker's config.yaml. The Deployment's checksum/config annotation hashes exactly this, so
a change rolls the pods; the policy is a separate file the broker reloads by itself.
*/}}
{{- define "token-broker.config" -}}
{{- $v := .Values -}}
{{- $secrets := include "token-broker.secretsDir" . -}}
{{- $addr := $v.listenAddress -}}
{{- if contains ":" $addr -}}{{- $addr = printf "[%s]" $addr -}}{{- end -}}
{{- $stopping := addf (float64 ($v.server.shutdownDelaySeconds | default 0)) (float64 $v.server.shutdownGraceSeconds) -}}
{{- if le (float64 $v.terminationGracePeriodSeconds) $stopping -}}
{{- fail (printf "token-broker: terminationGracePeriodSeconds (%v) must be longer than server.shutdownDelaySeconds + server.shutdownGraceSeconds (%v), or the kubelet kills calls still draining" $v.terminationGracePeriodSeconds $stopping) -}}
{{- end -}}
{{- $tls := dict "certFile" (printf "%s/tls/tls.crt" $secrets) "keyFile" (printf "%s/tls/tls.key" $secrets) -}}
{{- if include "token-broker.clientCAEnabled" . -}}
{{- if and $v.tls.clientCA.secretName $v.tls.clientCA.configMapName -}}
{{- fail "token-broker: set tls.clientCA.secretName or tls.clientCA.configMapName, not both" -}}
{{- end -}}
{{- $_ := set $tls "clientCaFile" (printf "%s/client-ca/ca.crt" $secrets) -}}
{{- $_ := set $tls "requireClientCert" $v.tls.clientCA.requireClientCert -}}
{{- else if $v.authentication.mtls.enabled -}}
{{- fail "token-broker: authentication.mtls.enabled needs tls.clientCA.secretName or tls.clientCA.configMapName (the CA of the client certificates)" -}}
{{- end -}}
{{- $server := deepCopy $v.server -}}
{{- $_ := set $server "listen" (printf "%s:%d" $addr (int $v.ports.grpc)) -}}
{{- $_ := set $server "healthListen" (printf "%s:%d" $addr (int $v.ports.health)) -}}
{{- if $v.http.enabled -}}
{{- $_ := set $server "httpListen" (printf "%s:%d" $addr (int $v.http.port)) -}}
{{- end -}}
{{- $_ := set $server "tls" $tls -}}
{{- $kubernetes := deepCopy $v.kubernetes -}}
{{- $_ := set $kubernetes "mode" "inCluster" -}}
{{- $apiKeys := dict "keys" $v.authentication.apiKeys.keys -}}
{{- if $v.authentication.apiKeys.existingSecret -}}
{{- $_ := set $apiKeys "file" (printf "%s/api-keys/keys.yaml" $secrets) -}}
{{- end -}}
{{- $issuers := list -}}
{{- range $i, $issuer := $v.authentication.jwt.issuers -}}
{{- $out := omit $issuer "jwksSecret" "jwksCaSecret" -}}
{{- if $issuer.jwksSecret -}}
{{- $_ := set $out "jwksFile" (printf "%s/jwks/%d/jwks.json" $secrets $i) -}}
{{- end -}}
{{- if $issuer.jwksCaSecret -}}
{{- $_ := set $out "jwksCaFile" (printf "%s/jwks-ca/%d/ca.crt" $secrets $i) -}}
{{- end -}}
{{- $issuers = append $issuers $out -}}
{{- end -}}
{{- $authn := dict "mtls" (dict "enabled" $v.authentication.mtls.enabled) "apiKeys" $apiKeys "jwt" (dict "issuers" $issuers) -}}
{{- $rateLimit := omit $v.rateLimit "redis" "perCaller" "perServiceAccount" "global" "authFailuresPerPeer" -}}
{{- range $scope := list "perCaller" "perServiceAccount" "global" "authFailuresPerPeer" -}}
{{- $limit := get $v.rateLimit $scope -}}
{{- if kindIs "map" $limit -}}
{{- $_ := set $rateLimit $scope $limit -}}
{{- else -}}
{{- $_ := set $rateLimit $scope nil -}}
{{- end -}}
{{- end -}}
{{- if eq $v.rateLimit.backend "redis" -}}
{{- $r := $v.rateLimit.redis -}}
{{- $addrPort := include "token-broker.addressPort" (required "token-broker: rateLimit.redis.address (host:port) is required with rateLimit.backend: redis" $r.address) -}}
{{- $redis := dict "address" $r.address "keyPrefix" $r.keyPrefix "timeoutSeconds" $r.timeoutSeconds "retryIntervalSeconds" $r.retryIntervalSeconds -}}
{{- if $r.username -}}{{- $_ := set $redis "username" $r.username -}}{{- end -}}
{{- if $r.existingSecret -}}
{{- $_ := set $redis "passwordFile" (printf "%s/redis/password" $secrets) -}}
{{- end -}}
{{- $redisTLS := dict "enabled" $r.tls.enabled -}}
{{- if $r.tls.enabled -}}
{{- if $r.tls.caSecret -}}
{{- $_ := set $redisTLS "caFile" (printf "%s/redis-ca/ca.crt" $secrets) -}}
{{- end -}}
{{- if $r.tls.clientCertSecret -}}
{{- $_ := set $redisTLS "certFile" (printf "%s/redis-client/tls.crt" $secrets) -}}
{{- $_ := set $redisTLS "keyFile" (printf "%s/redis-client/tls.key" $secrets) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $redis "tls" $redisTLS -}}
{{- $_ := set $rateLimit "redis" $redis -}}
{{- end -}}
{{- $config := dict
  "server" $server
  "kubernetes" $kubernetes
  "log" $v.log
  "policy" (dict "file" (printf "%s/policy.yaml" (include "token-broker.configDir" .)) "reloadIntervalSeconds" $v.policy.reloadIntervalSeconds)
  "audit" (merge (dict "sink" "stdout") $v.audit)
  "admin" (dict "listen" (printf "%s:%d" $addr (int $v.ports.admin)))
  "metrics" $v.metrics
  "readiness" $v.readiness
  "authentication" $authn
  "cache" $v.cache
  "rateLimit" $rateLimit
-}}
{{- toYaml $config -}}
{{- end -}}

{{/* The policy file: only the rules, as the broker reads them. */}}
{{- define "token-broker.policy" -}}
{{- toYaml (dict "rules" (.Values.policy.rules | default list)) -}}
{{- end -}}

{{/*
RBAC derived from policy.rules, as YAML:
  roles: {<namespace>: {resourceNames: [sorted service accounts], all: <bool>}}
  cluster: {enabled: <bool>, resourceNames: [...], all: <bool>}
A namespace or service account with *, ? or [ is a pattern (fnmatch). Patterns fail the
render unless rbac.allowWildcardGrants.
*/}}
{{- define "token-broker.rbacGrants" -}}
{{- $allow := .Values.rbac.allowWildcardGrants -}}
{{- $pattern := "[*?\\[]" -}}
{{- $roles := dict -}}
{{- $clusterNames := list -}}
{{- $clusterAll := false -}}
{{- $clusterEnabled := false -}}
{{- range $rule := .Values.policy.rules | default list -}}
{{- $saLiterals := list -}}
{{- $saPatterns := list -}}
{{- range $sa := $rule.serviceAccounts -}}
{{- if regexMatch $pattern $sa -}}
{{- $saPatterns = append $saPatterns $sa -}}
{{- else -}}
{{- $saLiterals = append $saLiterals $sa -}}
{{- end -}}
{{- end -}}
{{- range $ns := $rule.namespaces -}}
{{- if regexMatch $pattern $ns -}}
{{- if not $allow -}}
{{- fail (printf "token-broker: policy rule %q allows the namespace pattern %q: RBAC cannot grant by namespace pattern, so the broker would need a ClusterRole (create serviceaccounts/token in every namespace). List the namespaces by name, or set rbac.allowWildcardGrants=true to render that ClusterRole." $rule.name $ns) -}}
{{- end -}}
{{- $clusterEnabled = true -}}
{{- $clusterNames = concat $clusterNames $saLiterals -}}
{{- if $saPatterns -}}{{- $clusterAll = true -}}{{- end -}}
{{- else -}}
{{- $role := get $roles $ns | default (dict "resourceNames" list "all" false) -}}
{{- if $saPatterns -}}
{{- if not $allow -}}
{{- fail (printf "token-broker: policy rule %q allows the service-account pattern %q in namespace %q: RBAC resourceNames cannot express a pattern, so the broker would need create on the token of every service account in %q. List the service accounts by name, or set rbac.allowWildcardGrants=true to render a Role without resourceNames there." $rule.name (first $saPatterns) $ns $ns) -}}
{{- end -}}
{{- $_ := set $role "all" true -}}
{{- end -}}
{{- $_ := set $role "resourceNames" (concat $role.resourceNames $saLiterals | uniq | sortAlpha) -}}
{{- $_ := set $roles $ns $role -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "roles" $roles "cluster" (dict "enabled" $clusterEnabled "all" $clusterAll "resourceNames" ($clusterNames | uniq | sortAlpha))) -}}
{{- end -}}
