#!/usr/bin/env bash
# Tests charts/mayfly offline: no cluster is needed (or available in CI).
#
#   scripts/test-chart.sh
#
# 1. helm lint --strict, with the default values and each charts/mayfly/ci/*.yaml;
# 2. helm template for the same cases, piped through kubernetes-validate (strict,
#    Kubernetes 1.30 schemas) and scripts/chart-render-check.py (selectors,
#    hardening, probes, every file mayfly.toml names is mounted (the Vault token
#    without subPath), restricted egress still reaches the providers; the
#    ServiceMonitor CRD, which kubernetes-validate has no schema for);
# 3. if a mayfly binary is at $MAYFLY_BIN, target/{debug,release}/mayfly or on PATH
#    (skipped otherwise): the rendered Cedar policies through `mayfly policy check`,
#    and the rendered mayfly.toml through the broker's own config parser;
# 4. values that must be refused: wrong types, unknown keys, bad enums and
#    durations (values.schema.json), and combinations the templates `fail` on
#    (more than one replica with the embedded store, ...).
#
# Needs: helm (scripts/install-helm.sh), kubernetes-validate (pip install
# kubernetes-validate), python3 >= 3.11 with PyYAML. Runs every check, prints each
# failure with its output, and exits 1 if any failed.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
chart="$root/charts/mayfly"
checker="$root/scripts/chart-render-check.py"
kube_version="1.30.0"
release="mayfly"
namespace="mayfly"

# helm may have been installed by install-helm.sh without being on PATH yet.
PATH="$PATH:$HOME/.local/bin"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

failures=()
passed=0
started=$SECONDS

pass() { passed=$((passed + 1)); printf 'ok    %s\n' "$1"; }
fail() {
    failures+=("$1")
    printf 'FAIL  %s\n' "$1"
    [[ -n "${2:-}" ]] && sed 's/^/      | /' <<<"$2"
}

for tool in helm kubernetes-validate python3; do
    if ! command -v "$tool" >/dev/null; then
        echo "test-chart: '$tool' not found; install helm with scripts/install-helm.sh and kubernetes-validate with 'pip install kubernetes-validate'" >&2
        exit 1
    fi
done
if ! python3 -c 'import tomllib, yaml' 2>/dev/null; then
    echo "test-chart: python3 >= 3.11 with PyYAML is required (pip install pyyaml)" >&2
    exit 1
fi

mayfly_bin="${MAYFLY_BIN:-}"
if [[ -n "$mayfly_bin" && "$mayfly_bin" != /* ]]; then mayfly_bin="$PWD/$mayfly_bin"; fi
if [[ -z "$mayfly_bin" ]]; then
    for candidate in "$root/target/debug/mayfly" "$root/target/release/mayfly" "$(command -v mayfly || true)"; do
        if [[ -n "$candidate" && -x "$candidate" ]]; then mayfly_bin="$candidate"; break; fi
    done
fi

echo "helm $(helm version --short), kubernetes-validate $(kubernetes-validate --version), schemas for Kubernetes $kube_version"

# --- lint -------------------------------------------------------------------------

# `helm lint` only logs a template `fail` ("funcMap fail") and still passes, so a
# failing cross-field check has to be caught in its output.
lint() {
    local name="$1"; shift
    local out
    if ! out="$(helm lint --strict "$chart" "$@" 2>&1)"; then
        fail "lint $name" "$out"
    elif grep -q 'funcMap fail' <<<"$out"; then
        fail "lint $name (a template check failed)" "$out"
    else
        pass "lint $name"
    fi
}

lint "default values"
for values in "$chart"/ci/*.yaml; do
    lint "$(basename "$values")" -f "$values"
done

# --- render and validate ----------------------------------------------------------

# render NAME [--expect KIND|--absent KIND]... -- [helm args]...
render() {
    local name="$1"; shift
    local checks=()
    while [[ "$1" != "--" ]]; do checks+=("$1"); shift; done
    shift
    local out="$work/$name.yaml" core="$work/$name.core.yaml" msg

    if ! msg="$(helm template "$release" "$chart" --namespace "$namespace" \
            --kube-version "$kube_version" "$@" 2>&1 >"$out")"; then
        fail "template $name" "$msg"
        return
    fi
    pass "template $name"

    if msg="$(python3 "$checker" split "$out" "$core" 2>&1)"; then
        pass "$name: CRD objects (ServiceMonitor, cert-manager, TLSRoute)"
    else
        fail "$name: CRD objects (ServiceMonitor, cert-manager, TLSRoute)" "$msg"
    fi

    if msg="$(kubernetes-validate --strict --quiet -k "$kube_version" - <"$core" 2>&1)"; then
        pass "$name: kubernetes-validate --strict -k $kube_version"
    else
        fail "$name: kubernetes-validate --strict -k $kube_version" "$msg"
    fi

    local policies="$work/$name.policies"
    mkdir -p "$policies"
    if msg="$(python3 "$checker" check "$out" "${checks[@]}" --policy-dir "$policies" 2>&1)"; then
        pass "$name: render checks (selectors, hardening, probes, mounts, mayfly.toml keys)"
    else
        fail "$name: render checks" "$msg"
    fi

    if [[ -n "$mayfly_bin" && -z "${SKIP_BROKER:-}" ]]; then
        if msg="$("$mayfly_bin" policy check "$policies" 2>&1)"; then
            pass "$name: mayfly policy check ($msg)"
        else
            fail "$name: mayfly policy check" "$msg"
        fi
        broker_parses_config "$name" "$out"
    fi
}

# The broker's own parser (deny_unknown_fields, durations, URL schemes, ...) is the
# final word on mayfly.toml. The in-pod paths are moved under a sandbox directory in
# which every file the config names is created (placeholders; the policies and the
# mounted file layout come from the render), and `mayfly config check` must accept it:
# it validates the config and opens every file and directory it names.
broker_parses_config() {
    local name="$1" rendered="$2"
    local sandbox="$work/$name.root" toml="$work/$name.mayfly.toml" msg
    mkdir -p "$sandbox"
    if ! msg="$(python3 "$checker" config "$rendered" "$toml" "$sandbox" 2>&1)"; then
        fail "$name: broker accepts mayfly.toml" "$msg"
        return
    fi
    if msg="$(cd "$sandbox" && timeout 30 "$mayfly_bin" config check "$toml" 2>&1)"; then
        pass "$name: broker accepts mayfly.toml ($msg)"
    else
        fail "$name: broker accepts mayfly.toml" "$msg"
    fi
}

render default \
    --expect StatefulSet --expect Service --expect ConfigMap --expect ServiceAccount \
    --expect PodDisruptionBudget --expect NetworkPolicy \
    --absent HorizontalPodAutoscaler --absent ServiceMonitor --
render full-values \
    --expect HorizontalPodAutoscaler --expect ServiceMonitor --expect NetworkPolicy \
    --expect PodDisruptionBudget -- \
    -f "$chart/ci/full-values.yaml"
render secret-identity-values \
    --absent PodDisruptionBudget --absent NetworkPolicy --absent HorizontalPodAutoscaler -- \
    -f "$chart/ci/secret-identity-values.yaml"
render single-embedded-replica --expect PodDisruptionBudget -- \
    --set replicaCount=1 --set config.store.kind=embedded
# The embedded store's page cache, bounded below the pod's memory limit.
render embedded-cache-bytes --expect StatefulSet -- \
    --set replicaCount=1 --set config.store.kind=embedded --set config.store.cache_bytes=67108864
if grep -q '^    cache_bytes = 67108864$' "$work/embedded-cache-bytes.yaml"; then
    pass "embedded-cache-bytes: mayfly.toml [store] cache_bytes = 67108864"
else
    fail "embedded-cache-bytes: mayfly.toml [store] cache_bytes = 67108864"
fi
render providers-values --expect NetworkPolicy --expect ServiceAccount -- \
    -f "$chart/ci/providers-values.yaml"
# The other Vault login (AppRole, its secret_id from a Secret), the Vault CA from a
# Secret, and AWS through an endpoint_url on its own port with EKS Pod Identity.
render providers-approle --expect NetworkPolicy -- \
    --set networkPolicy.egress.restrict=true --set networkPolicy.egress.aws.podIdentityAgent=true \
    --set-json 'config.providers.vault={"address":"https://vault.example.org","approle":{"role_id":"mayfly-broker","secret_id_secret":{"name":"mayfly-vault-approle","key":"secret-id"},"mount":"approle/prod"},"ca":{"secret":{"name":"vault-ca","key":"ca.pem"}},"targets":{"db":{"kind":"dynamic","path":"database/creds/readonly","method":"GET","max_ttl":"1h"}}}' \
    --set-json 'config.providers.aws={"region":"us-east-1","endpoint_url":"https://aws-emulator.example.org:4566","revocation":"expires_only","targets":{"ci":{"role_arn":"arn:aws:iam::123456789012:role/mayfly-ci"}}}'

# The worked examples (charts/mayfly/examples/): the production ones alone and with
# the CI exchange on top, as their headers tell users to install them.
examples="$chart/examples"
render example-evaluation \
    --expect StatefulSet --expect Certificate --expect Issuer --absent Ingress -- \
    -f "$examples/evaluation.yaml"
render example-production-spire --expect StatefulSet --expect NetworkPolicy -- \
    -f "$examples/production-spire.yaml"
render example-github-actions --expect Ingress -- \
    -f "$examples/production-spire.yaml" -f "$examples/github-actions.yaml"
render example-gitlab-ci --expect TLSRoute -- \
    -f "$examples/production-spire.yaml" -f "$examples/gitlab-ci.yaml"
if msg="$(kubernetes-validate --strict --quiet -k "$kube_version" "$examples/redis.yaml" 2>&1)"; then
    pass "example redis.yaml: kubernetes-validate --strict -k $kube_version"
else
    fail "example redis.yaml: kubernetes-validate --strict -k $kube_version" "$msg"
fi
if grep -q -- '--appendfsync' "$examples/redis.yaml" && grep -A1 -- '--appendfsync' "$examples/redis.yaml" | grep -q always \
    && grep -A1 -- '--appendonly' "$examples/redis.yaml" | grep -q '"yes"'; then
    pass "example redis.yaml: appendonly yes + appendfsync always (what durability: aof checks)"
else
    fail "example redis.yaml: appendonly yes + appendfsync always (what durability: aof checks)"
fi

# Every section of the config through values: bundle endpoints, JWT-SVIDs from files,
# OIDC issuers with a static JWKS, bearer limits, anomaly rules, a webhook, Redis TLS.
render all-sections --expect StatefulSet -- \
    -f "$chart/ci/all-sections-values.yaml"
# The signing key set (issue 16) renders `keys_dir`.
render signing-key-set --expect StatefulSet -- \
    --set config.providers.jwt.signing_keys.enabled=true
# Limits and audit keys of issue 17 (rendered only when set).
render hostile-client-limits --expect StatefulSet -- \
    --set config.limits.header_read_timeout=10s --set config.limits.max_connections_per_source=64 \
    --set config.limits.unauth_rate_per_source=20 --set config.audit.rotate_bytes=67108864 \
    --set config.audit.anchor_interval=10s
# Without persistence (evaluation on an emptyDir).
render no-persistence --expect StatefulSet -- \
    --set persistence.enabled=false --set replicaCount=1 --set config.store.kind=embedded

[[ -n "$mayfly_bin" ]] || echo "skip  mayfly policy check and config parse (no mayfly binary; set MAYFLY_BIN)"

# --- the GitHub Actions example accepts a token ---------------------------------
#
# The rendered config of examples/github-actions.yaml (on top of the evaluation
# example, which needs no SPIRE) run by the real broker: its GitHub issuer, audience,
# job claims and policies as rendered; the one change is where the issuer's keys come
# from (the dev OIDC issuer's JWKS file instead of discovery at GitHub). Tokens from
# `mayfly dev token` with GitHub's claims, in both `sub` forms, are exchanged at
# POST /v1/token; a token of another repository id is refused.
github_exchange() {
    local d="$work/gh" dev="$work/gh/dev" msg pid="" serve_pid="" port
    mkdir -p "$d"
    helm template "$release" "$chart" --namespace "$namespace" --kube-version "$kube_version" \
        -f "$examples/evaluation.yaml" -f "$examples/github-actions.yaml" >"$d/rendered.yaml" 2>"$d/err" \
        || { fail "github-actions example: render" "$(cat "$d/err")"; return; }
    # The dev PKI (CA, server certificate for 127.0.0.1, JWT key, dev OIDC issuer key).
    "$mayfly_bin" dev --dir "$dev" --listen 127.0.0.1:0 --policies "$root/config/policies" >"$d/dev.log" 2>&1 &
    pid=$!
    local deadline=$((SECONDS + 60))
    while [[ ! -s "$dev/dev.json" ]] && ((SECONDS < deadline)) && kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    [[ -s "$dev/dev.json" ]] || { fail "github-actions example: mayfly dev PKI" "$(cat "$d/dev.log")"; return; }
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    if ! msg="$(python3 "$checker" config "$d/rendered.yaml" "$d/mayfly.toml" "$d/root" 2>&1)"; then
        fail "github-actions example: reroot config" "$msg"; return
    fi
    if ! msg="$(python3 - "$d/mayfly.toml" "$dev" "$port" 2>&1 <<'PY'
import shutil, sys, tomllib
path, dev, port = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(path, encoding="utf-8").read()
cfg = tomllib.loads(text)
gh = [i for i in cfg["oidc_issuers"] if i["issuer"] == "https://token.actions.githubusercontent.com"]
assert len(gh) == 1 and "jwks_file" not in gh[0] and "jwks_uri" not in gh[0], gh
text = text.replace('issuer = "https://token.actions.githubusercontent.com"',
                    f'issuer = "https://token.actions.githubusercontent.com"\njwks_file = "{dev}/oidc-jwks.json"', 1)
text = text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"', 1)
open(path, "w", encoding="utf-8").write(text)
shutil.copy(f"{dev}/server.pem", cfg["tls"]["cert_file"])
shutil.copy(f"{dev}/server-key.pem", cfg["tls"]["key_file"])
shutil.copy(f"{dev}/ca.pem", cfg["trust_domains"][0]["bundle_file"])
shutil.copy(f"{dev}/jwt-signing-key.pem", cfg["providers"]["jwt"]["signing_key_file"])
PY
)"; then
        fail "github-actions example: install the dev keys" "$msg"; return
    fi
    (cd "$d/root" && exec "$mayfly_bin" --log-format json serve -c "$d/mayfly.toml") >"$d/serve.log" 2>&1 &
    serve_pid=$!
    deadline=$((SECONDS + 60))
    until grep -q 'mayfly listening' "$d/serve.log" 2>/dev/null; do
        if ((SECONDS > deadline)) || ! kill -0 "$serve_pid" 2>/dev/null; then
            fail "github-actions example: broker start" "$(tail -20 "$d/serve.log")"
            kill "$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null
            return
        fi
        sleep 0.2
    done
    local claims='"iss":"https://token.actions.githubusercontent.com","aud":"https://mayfly.example.org","repository":"acme/deploy","repository_owner":"acme","repository_owner_id":"987654","ref":"refs/heads/main","run_id":"4242","run_attempt":"1"'
    exchange() { # exchange REPOSITORY_ID SUB_FORMAT -> the response body
        local token
        token="$("$mayfly_bin" dev token --dir "$dev" --oidc --sub-format "$2" \
            --claims "{$claims,\"repository_id\":\"$1\"}")" || return 1
        curl -s --max-time 20 --cacert "$dev/ca.pem" "https://127.0.0.1:$port/v1/token" \
            -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \
            -d subject_token_type=urn:ietf:params:oauth:token-type:jwt \
            --data-urlencode "subject_token=$token" \
            -d resource=https://deploy.example.org -d scope=deploy:staging
    }
    local form body
    for form in legacy immutable; do
        body="$(exchange 123456789 "$form")"
        if grep -q '"access_token"' <<<"$body"; then
            pass "github-actions example: exchanges a dev OIDC token with a $form sub"
        else
            fail "github-actions example: exchanges a dev OIDC token with a $form sub" "$body
$(tail -5 "$d/serve.log")"
        fi
    done
    body="$(exchange 123456780 immutable)"
    if grep -q '"error":"invalid_target"' <<<"$body" && ! grep -q access_token <<<"$body"; then
        pass "github-actions example: refuses a token of another repository id"
    else
        fail "github-actions example: refuses a token of another repository id" "$body"
    fi
    kill "$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null
}
if [[ -n "$mayfly_bin" ]]; then github_exchange; fi

# --- values that must be refused --------------------------------------------------

# refuse NAME EXPECTED_MESSAGE [helm args]...: helm template must fail, and say why.
refuse() {
    local name="$1" expected="$2"; shift 2
    local out
    if out="$(helm template "$release" "$chart" --namespace "$namespace" \
            --kube-version "$kube_version" "$@" 2>&1)"; then
        fail "refuses $name (it rendered)" "$(head -5 <<<"$out")"
    elif ! grep -qF -- "$expected" <<<"$out"; then
        fail "refuses $name, but not with \"$expected\"" "$out"
    else
        pass "refuses $name"
    fi
}

refuse "replicaCount=three (string for integer)" "replicaCount" --set replicaCount=three
refuse 'replicaCount="3" (JSON string)' "replicaCount" --set-json 'replicaCount="3"'
refuse "limits.max_body_bytes as a string" "max_body_bytes" --set-string config.limits.max_body_bytes=65536
refuse "unknown key config.limits.max_pages" "max_pages" --set config.limits.max_pages=5
refuse "unknown top-level key" "replicas" --set replicas=3
refuse "store.durability=fsync (not aof|wait|server)" "durability" --set config.store.durability=fsync
refuse "store.kind=postgres" "kind" --set config.store.kind=postgres
refuse "store.url with an http:// scheme" "url" --set config.store.url=http://redis:6379
refuse "store.key_prefix with a hash-tag brace" "key_prefix" --set 'config.store.key_prefix=a{b}'
refuse "store.wait_replicas=0" "wait_replicas" --set config.store.wait_replicas=0
refuse "duration 1hour" "max_lease_ttl" --set config.limits.max_lease_ttl=1hour
refuse "default_lease_ttl above max_lease_ttl" "exceeds config.limits.max_lease_ttl" \
    --set config.limits.default_lease_ttl=2h --set config.limits.max_lease_ttl=90m
refuse "non-https JWT issuer" "issuer" --set config.providers.jwt.issuer=http://mayfly.example.org
refuse "policy file not named *.cedar" "evil.toml" --set-json 'policies={"evil.toml":"x"}'
refuse "trust bundle from both a ConfigMap and a Secret" "bundle" \
    --set-json 'config.trust_domains=[{"name":"a.org","bundle":{"configMap":{"name":"a","key":"k"},"secret":{"name":"b","key":"k"}}}]'
refuse "identity.mode=vault" "mode" --set identity.mode=vault
refuse "embedded store with replicaCount=3" "config.store.kind=embedded cannot run with more than one replica" \
    --set replicaCount=3 --set config.store.kind=embedded
refuse "embedded store with the default replicaCount" "config.store.kind=embedded cannot run with more than one replica" \
    --set config.store.kind=embedded
refuse "an embedded page cache under 4 MiB" "cache_bytes" \
    --set replicaCount=1 --set config.store.kind=embedded --set config.store.cache_bytes=1024
refuse "a page cache size with the Redis store" "config.store.cache_bytes sizes the embedded store's page cache" \
    --set config.store.cache_bytes=67108864
refuse "embedded store under an HPA" "config.store.kind=embedded cannot run with more than one replica" \
    --set replicaCount=1 --set config.store.kind=embedded --set autoscaling.enabled=true
refuse "HPA maxReplicas below minReplicas" "autoscaling.maxReplicas" \
    --set autoscaling.enabled=true --set autoscaling.minReplicas=4 --set autoscaling.maxReplicas=2
refuse "a trust domain listed twice" "listed twice" \
    --set-json 'config.trust_domains=[{"name":"a.org","bundle":{"configMap":{"name":"a","key":"k"}}},{"name":"a.org","bundle":{"secret":{"name":"b","key":"k"}}}]'
refuse "no trust domain" "trust_domains" --set-json 'config.trust_domains=[]'
refuse "SPIFFE CSI mode before Kubernetes 1.29" "needs Kubernetes >= 1.29" \
    --set identity.mode=spiffeCsi --kube-version 1.28.0

# Providers (on top of ci/providers-values.yaml, which renders).
providers=(-f "$chart/ci/providers-values.yaml")
refuse "vault with both token_secret and approle" "oneOf" "${providers[@]}" \
    --set-json 'config.providers.vault.approle={"role_id":"r","secret_id_secret":{"name":"s","key":"k"}}'
refuse "vault with neither token_secret nor approle" "oneOf" \
    --set-json 'config.providers.vault={"address":"https://vault.example.org","targets":{"t":{"kind":"dynamic","path":"kv/creds","max_ttl":"1h"}}}'
refuse "vault file path set directly (token_file)" "token_file" "${providers[@]}" \
    --set config.providers.vault.token_file=/run/secrets/token
refuse "vault target of unknown kind" "kind" "${providers[@]}" \
    --set config.providers.vault.targets.app-secrets.kind=kv
refuse "vault token target allowing the root policy" "allowed_policies" "${providers[@]}" \
    --set-json 'config.providers.vault.targets.app-secrets.allowed_policies=["root"]'
refuse "vault dynamic target under sys/" "path" "${providers[@]}" \
    --set config.providers.vault.targets.db-readonly.path=sys/leases/lookup
refuse "vault GET target with ttl_param" "need method: POST" "${providers[@]}" \
    --set config.providers.vault.targets.db-readonly.ttl_param=ttl
refuse "vault without targets" "targets" \
    --set-json 'config.providers.vault={"address":"https://vault.example.org","token_secret":{"name":"t","key":"k"},"targets":{}}'
refuse "vault http:// address to a non-loopback host" "address" "${providers[@]}" \
    --set config.providers.vault.address=http://vault.vault.svc:8200
refuse "vault http:// loopback address without allow_insecure_http" "allow_insecure_http=true" "${providers[@]}" \
    --set config.providers.vault.address=http://127.0.0.1:8200
refuse "aws revocation=revoke_now (not deny_policy|expires_only)" "revocation" "${providers[@]}" \
    --set config.providers.aws.revocation=revoke_now
refuse "aws static access key in values" "access_key_id" "${providers[@]}" \
    --set config.providers.aws.access_key_id=AKIAEXAMPLE
refuse "aws role_arn naming a user" "role_arn" "${providers[@]}" \
    --set config.providers.aws.targets.reports-bucket.role_arn=arn:aws:iam::123456789012:user/mayfly
refuse "aws max_session_duration=13h" "between 1h and 12h" "${providers[@]}" \
    --set config.providers.aws.targets.reports-bucket.max_session_duration=13h

# The new sections' schema and cross-field checks.
refuse "oidc issuer over http://" "issuer" \
    --set-json 'config.oidc_issuers=[{"issuer":"http://ci.example.org","audiences":["a"]}]'
refuse "oidc issuer without audiences" "audiences" \
    --set-json 'config.oidc_issuers=[{"issuer":"https://ci.example.org"}]'
refuse "oidc issuer with both jwks and jwks_uri" "oidc" \
    --set-json 'config.oidc_issuers=[{"issuer":"https://ci.example.org","audiences":["a"],"jwks_uri":"https://ci.example.org/k","jwks":{"configMap":{"name":"j","key":"k"}}}]'
refuse "oidc algorithm none" "algorithms" \
    --set-json 'config.oidc_issuers=[{"issuer":"https://ci.example.org","audiences":["a"],"algorithms":["none"]}]'
refuse "unknown key in jwt_svid" "bundle_file" \
    --set-json 'config.jwt_svid=[{"trust_domain":"a.org","audiences":["a"],"bundle_file":"/x"}]'
refuse "trust domain from workload_api with a bundle" "trust_domains" \
    --set-json 'config.trust_domains=[{"name":"a.org","source":"workload_api","bundle":{"configMap":{"name":"a","key":"k"}}}]' \
    --set config.workload_api.enabled=true
refuse "workload_api source without workload_api.enabled" "needs config.workload_api.enabled=true" \
    --set-json 'config.trust_domains=[{"name":"a.org","source":"workload_api"}]'
refuse "workload_api.enabled without a workload_api source" "no trust domain or jwt_svid entry" \
    --set config.workload_api.enabled=true
refuse "anomaly rule with an unknown signal" "signal" \
    --set-json 'config.anomaly={"rules":[{"name":"x","signal":"typo","threshold":1,"window":"1m","action":"deny"}]}'
refuse "webhook without its secret" "secret" --set config.webhook.url=https://hooks.example.org/m
refuse "webhook over http://" "url" --set config.webhook.url=http://hooks.example.org/m
refuse "ingress without a host" "host" --set expose.ingress.enabled=true
refuse "cert-manager PKI with a JWT key other than tls.key" "signing_key_secret.key=tls.key" \
    --set certManager.selfSigned.enabled=true
refuse "limits.max_connections_per_source as a string" "max_connections_per_source" \
    --set-string config.limits.max_connections_per_source=64
refuse "persistence.size not a quantity" "size" --set persistence.size=lots

# A wrong type must also fail `helm lint --strict`, not only install/template.
if out="$(helm lint --strict "$chart" --set replicaCount=three 2>&1)"; then
    fail "lint refuses replicaCount=three (it passed)" "$out"
else
    pass "lint refuses replicaCount=three"
fi

# --- summary ----------------------------------------------------------------------

elapsed=$((SECONDS - started))
if ((${#failures[@]})); then
    printf '\n%d passed, %d FAILED (%ds):\n' "$passed" "${#failures[@]}" "$elapsed"
    printf '  - %s\n' "${failures[@]}"
    exit 1
fi
printf '\nchart tests: all %d passed (%ds)\n' "$passed" "$elapsed"
