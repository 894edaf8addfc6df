#!/usr/bin/env python3
"""Checks on `helm template` output of charts/mayfly that no schema can make.

    chart-render-check.py split RENDERED.yaml CORE.yaml
        Write the built-in Kubernetes kinds to CORE.yaml (for kubernetes-validate,
        which has no schema for CRDs) and check the CRD objects (ServiceMonitor)
        here instead.
    chart-render-check.py check RENDERED.yaml [--expect KIND]... [--absent KIND]...
                                [--policy-dir DIR]
        Cross-object checks: selectors match the pods, the hardening is in place,
        probes hit the right endpoints, every file the rendered mayfly.toml names
        is actually mounted into the broker container (files the broker re-reads,
        like the Vault token, without subPath so Secret updates reach them), and a
        restricted egress NetworkPolicy lets the broker reach its providers. With
        --policy-dir, the rendered *.cedar files are written there for
        `mayfly policy check`.
    chart-render-check.py config RENDERED.yaml OUT.toml ROOT
        Write the rendered mayfly.toml with its in-pod paths moved under ROOT and
        `listen` on 127.0.0.1:0, and create under ROOT every file and directory it
        names (placeholders) and the policies, so `mayfly config check OUT.toml` runs
        the broker's real config parser and file checks without the pod's mounts.

Prints one line per problem and exits 1 if there is any.
"""

import argparse
import json
import sys
import tomllib
from pathlib import Path, PurePosixPath

import yaml

# Built-in API groups kubernetes-validate knows; anything else is a CRD.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"),
             ("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate"),
             ("gateway.networking.k8s.io/v1alpha2", "TLSRoute")}

# The config keys the broker accepts (src/config/, RawConfig and friends, with
# `deny_unknown_fields`): an extra key here means `mayfly serve` refuses to start.
# Keep in step with src/config/; `mayfly config check` (run below when a binary is
# present) is the authority and catches any drift of this list.
ALLOWED_KEYS = {
    "": {"listen", "node_id", "tls", "trust_domains", "operators", "policy", "store",
         "audit", "limits", "reaper", "providers", "anomaly", "webhook", "workload_api",
         "bearer", "jwt_svid", "oidc_issuers"},
    "tls": {"cert_file", "key_file"},
    "trust_domains[]": {"name", "source", "bundle_file", "bundle_endpoint", "endpoint_profile",
                        "endpoint_spiffe_id", "endpoint_ca_file", "refresh_min", "refresh_max"},
    "workload_api": {"socket", "initial_timeout", "backoff_min", "backoff_max"},
    "bearer": {"max_token_bytes", "replay_cache_size", "fetch_timeout"},
    "jwt_svid[]": {"trust_domain", "bundle_file", "bundle_endpoint", "source", "endpoint_profile",
                   "endpoint_spiffe_id", "endpoint_ca_file", "audiences", "allow_multiple_audiences",
                   "algorithms", "leeway", "refresh_interval", "refetch_cooldown", "max_keys",
                   "single_use", "allow_insecure_http"},
    "oidc_issuers[]": {"issuer", "audiences", "jwks_file", "jwks_uri", "algorithms", "typ", "leeway",
                       "jwks_ttl", "refetch_cooldown", "max_keys", "allow_multiple_audiences",
                       "single_use", "job_claims", "max_exchange_ttl", "allow_insecure_http"},
    "anomaly": {"risk_window", "deny_for", "rules"},
    "anomaly.rules[]": {"name", "signal", "threshold", "window", "action", "mode", "class",
                        "min_severity"},
    "webhook": {"url", "secret_file", "ca_file", "timeout", "max_attempts", "events"},
    "operators": {"spiffe_ids"},
    "policy": {"dir", "reload_interval"},
    "store/embedded": {"kind", "path", "cache_bytes"},
    "store/redis": {"kind", "url", "key_prefix", "username", "password_file", "tls_ca_file", "durability",
                    "wait_replicas", "wait_timeout", "verify_durability", "op_timeout"},
    # rotate_bytes ... summary_interval, and the connection limits below them: issue 17
    # (OWNERSHIP.md); the broker accepts them once that work is merged.
    "audit": {"path", "rotate_bytes", "retain_files", "anchor_interval", "summary_interval"},
    "limits": {"max_task_ttl", "max_lease_ttl", "default_lease_ttl", "pending_timeout",
               "max_body_bytes", "max_connections", "handshake_timeout", "max_page",
               "max_delegation_depth", "max_in_flight", "header_read_timeout",
               "body_read_timeout", "idle_timeout", "h2_keepalive_interval",
               "h2_keepalive_timeout", "max_header_bytes", "h2_max_concurrent_streams",
               "h2_max_header_list_bytes", "max_connections_per_source",
               "unauth_rate_per_source", "unauth_burst_per_source"},
    "reaper": {"interval", "batch", "claim_hold", "max_attempts", "backoff_base", "backoff_max"},
    "providers": {"jwt", "vault", "aws"},
    # keys_dir: the signing key set (issue 16; placeholder name until that lands).
    "providers.jwt": {"issuer", "signing_key_file", "generate_key", "keys_dir"},
    # src/provider/vault/config.rs RawVault, RawAppRole, RawVaultTarget.
    "providers.vault": {"address", "token_file", "approle", "namespace", "ca_file", "timeout",
                        "rate_limit_per_second", "rate_limit_burst", "allow_insecure_http",
                        "targets"},
    "providers.vault.approle": {"role_id", "secret_id_file", "mount"},
    "providers.vault.targets/token": {"kind", "token_role", "allowed_policies"},
    "providers.vault.targets/dynamic": {"kind", "path", "method", "params", "ttl_param",
                                        "resource_param", "max_ttl"},
    # src/provider/aws/config.rs RawAws, RawAwsTarget.
    "providers.aws": {"region", "endpoint_url", "allow_insecure_http", "revocation",
                      "deny_policy_name", "prune_interval", "timeout", "rate_limit_per_second",
                      "rate_limit_burst", "targets", "on_policy_full", "reconcile_interval"},
    "providers.aws.targets[]": {"role_arn", "max_session_duration", "external_id"},
}

# Files the broker re-reads while running: their mount must not use subPath, or an
# updated Secret never reaches the pod (kubelet does not refresh subPath mounts).
REREAD_KEYS = {"providers.vault.token_file", "providers.vault.approle.secret_id_file"}

EXPECTED_COMMAND = ["mayfly", "serve", "-c", "/etc/mayfly/mayfly.toml", "--log-format", "json"]

problems: list[str] = []


def problem(msg: str) -> None:
    problems.append(msg)


def load(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def ident(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def one(docs: list[dict], kind: str) -> dict | None:
    found = [d for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        problem(f"expected exactly one {kind}, found {len(found)}")
        return None
    return found[0]


def selects(selector: dict, labels: dict, what: str) -> None:
    if not selector:
        problem(f"{what}: empty selector would match every pod in the namespace")
        return
    missing = {k: v for k, v in selector.items() if labels.get(k) != v}
    if missing:
        problem(f"{what}: selector {missing} does not match the pod labels")


# --- split -----------------------------------------------------------------------

def check_service_monitor(sm: dict, docs: list[dict]) -> None:
    spec = sm.get("spec", {})
    extra = set(spec) - {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    if extra:
        problem(f"{ident(sm)}: unexpected spec keys {sorted(extra)}")
    svc = next((d for d in docs if d.get("kind") == "Service"), None)
    if svc is None:
        problem(f"{ident(sm)}: no Service to monitor")
        return
    selects(spec.get("selector", {}).get("matchLabels", {}),
            svc["metadata"].get("labels", {}), f"{ident(sm)} -> {ident(svc)}")
    ns = sm["metadata"].get("namespace")
    if spec.get("namespaceSelector", {}).get("matchNames") != [ns]:
        problem(f"{ident(sm)}: namespaceSelector should name its own namespace {ns!r}")
    port_names = {p.get("name") for p in svc["spec"].get("ports", [])}
    endpoints = spec.get("endpoints") or []
    if not endpoints:
        problem(f"{ident(sm)}: no endpoints")
    for ep in endpoints:
        allowed = {"port", "scheme", "path", "interval", "scrapeTimeout", "tlsConfig"}
        if set(ep) - allowed:
            problem(f"{ident(sm)}: unexpected endpoint keys {sorted(set(ep) - allowed)}")
        if ep.get("port") not in port_names:
            problem(f"{ident(sm)}: endpoint port {ep.get('port')!r} is not a Service port {sorted(port_names)}")
        if ep.get("scheme") != "https" or ep.get("path") != "/metrics":
            problem(f"{ident(sm)}: endpoint must scrape https /metrics, got {ep.get('scheme')} {ep.get('path')}")
        if not isinstance(ep.get("tlsConfig", {}), dict):
            problem(f"{ident(sm)}: tlsConfig must be a mapping")


def split(rendered: str, core_out: str) -> None:
    docs = load(rendered)
    core = []
    for d in docs:
        key = (d.get("apiVersion"), d.get("kind"))
        if key in CRD_KINDS:
            if key[1] == "ServiceMonitor":
                check_service_monitor(d, docs)
        else:
            core.append(d)
    with open(core_out, "w", encoding="utf-8") as f:
        yaml.safe_dump_all(core, f, sort_keys=False)


# --- check -----------------------------------------------------------------------

def check_hardening(pod: dict, containers: list[dict]) -> None:
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True or psc.get("runAsUser") != 65532:
        problem(f"pod securityContext must run as non-root uid 65532, got {psc}")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problem("pod seccompProfile must be RuntimeDefault")
    if pod.get("automountServiceAccountToken") is not False:
        problem("the broker needs no Kubernetes API token: automountServiceAccountToken must be false")
    for c in containers:
        sc = c.get("securityContext", {})
        name = c.get("name")
        if sc.get("readOnlyRootFilesystem") is not True:
            problem(f"container {name}: readOnlyRootFilesystem must be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problem(f"container {name}: allowPrivilegeEscalation must be false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            problem(f"container {name}: capabilities must drop ALL")
        if sc.get("runAsNonRoot") is not True:
            problem(f"container {name}: runAsNonRoot must be true")
        if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problem(f"container {name}: seccompProfile must be RuntimeDefault")
        res = c.get("resources", {})
        if not res.get("requests") or not res.get("limits"):
            problem(f"container {name}: needs resource requests and limits")


def check_probes(broker: dict, port: int) -> None:
    ports = {p.get("name"): p.get("containerPort") for p in broker.get("ports", [])}
    if ports.get("https") != port:
        problem(f"container port 'https' is {ports.get('https')}, mayfly.toml listens on {port}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = broker.get(probe, {}).get("httpGet", {})
        if (get.get("path"), get.get("scheme"), get.get("port")) != (path, "HTTPS", "https"):
            problem(f"{probe} must be GET {path} over HTTPS on port 'https', got {get}")


def named_files(value, prefix: str = ""):
    """Every (key, path) of a `*_file` or `*_dir` key anywhere in the config, as
    `mayfly config check` finds them."""
    if isinstance(value, dict):
        for k, v in value.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, str) and (k.endswith("_file") or k.endswith("_dir")):
                yield key, v
            else:
                yield from named_files(v, key)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from named_files(v, f"{prefix}[{i}]")


def toml_paths(cfg: dict) -> list[tuple[str, str, bool]]:
    """(config key, path, must the broker be able to write it?)"""
    out = [(k, v, False) for k, v in named_files(cfg)]
    out += [("policy.dir", cfg["policy"]["dir"], False),
            ("audit.path", cfg["audit"]["path"], True)]
    store = cfg["store"]
    if store["kind"] == "embedded":
        out.append(("store.path", store["path"], True))
    socket = cfg.get("workload_api", {}).get("socket")
    if socket:
        out.append(("workload_api.socket", socket.removeprefix("unix://"), False))
    return out


def check_keys(cfg: dict) -> None:
    def unknown(section: str, table: dict, allowed: set) -> None:
        extra = set(table) - allowed
        if extra:
            problem(f"mayfly.toml [{section or 'top'}]: keys the broker rejects: {sorted(extra)}")

    unknown("", cfg, ALLOWED_KEYS[""])
    for section in ("tls", "operators", "policy", "audit", "limits", "reaper", "providers",
                    "workload_api", "bearer", "anomaly", "webhook"):
        unknown(section, cfg.get(section, {}), ALLOWED_KEYS[section])
    for section in ("jwt_svid", "oidc_issuers"):
        for entry in cfg.get(section, []):
            unknown(section, entry, ALLOWED_KEYS[f"{section}[]"])
    for rule in cfg.get("anomaly", {}).get("rules", []):
        unknown("anomaly.rules", rule, ALLOWED_KEYS["anomaly.rules[]"])
    providers = cfg.get("providers", {})
    unknown("providers.jwt", providers.get("jwt", {}), ALLOWED_KEYS["providers.jwt"])
    if "vault" in providers:
        vault = providers["vault"]
        unknown("providers.vault", vault, ALLOWED_KEYS["providers.vault"])
        if ("token_file" in vault) == ("approle" in vault):
            problem("mayfly.toml [providers.vault]: exactly one of token_file and approle is required")
        if "approle" in vault:
            unknown("providers.vault.approle", vault["approle"], ALLOWED_KEYS["providers.vault.approle"])
        if not vault.get("targets"):
            problem("mayfly.toml [providers.vault]: no target (the broker refuses to start)")
        for name, t in vault.get("targets", {}).items():
            section = f"providers.vault.targets.{name}"
            allowed = ALLOWED_KEYS.get(f"providers.vault.targets/{t.get('kind')}")
            if allowed is None:
                problem(f"mayfly.toml [{section}]: unknown kind {t.get('kind')!r}")
            else:
                unknown(section, t, allowed)
    if "aws" in providers:
        aws = providers["aws"]
        unknown("providers.aws", aws, ALLOWED_KEYS["providers.aws"])
        if not aws.get("targets"):
            problem("mayfly.toml [providers.aws]: no target (the broker refuses to start)")
        for name, t in aws.get("targets", {}).items():
            unknown(f"providers.aws.targets.{name}", t, ALLOWED_KEYS["providers.aws.targets[]"])
    for td in cfg.get("trust_domains", []):
        unknown("trust_domains", td, ALLOWED_KEYS["trust_domains[]"])
    kind = cfg.get("store", {}).get("kind")
    if f"store/{kind}" not in ALLOWED_KEYS:
        problem(f"mayfly.toml [store]: unknown kind {kind!r}")
    else:
        unknown("store", cfg["store"], ALLOWED_KEYS[f"store/{kind}"])
    if not cfg.get("trust_domains"):
        problem("mayfly.toml: no trust domain (the broker refuses to start)")
    if not str(cfg.get("providers", {}).get("jwt", {}).get("issuer", "")).startswith("https://"):
        problem("mayfly.toml: providers.jwt.issuer must be an https:// URL")


def check_mounts(cfg: dict, broker: dict, pod: dict, cm_data: dict, helper_conf: str | None,
                 claims: list[dict]) -> None:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    volumes.update({c["metadata"]["name"]: {"persistentVolumeClaim": {}} for c in claims})
    mounts = broker.get("volumeMounts", [])
    for m in mounts:
        if m["name"] not in volumes:
            problem(f"volumeMount {m['name']} has no volume")
    for key, raw, writable in toml_paths(cfg):
        path = PurePosixPath(raw)
        best = None
        for m in mounts:
            mp = PurePosixPath(m["mountPath"])
            if (path == mp or mp in path.parents) and (best is None or len(mp.parts) > len(PurePosixPath(best["mountPath"]).parts)):
                best = m
        if best is None:
            problem(f"{key} = {raw}: no volume is mounted there")
            continue
        if writable and best.get("readOnly"):
            problem(f"{key} = {raw}: the broker must write it but {best['mountPath']} is read-only")
        if not writable and not best.get("readOnly"):
            problem(f"{key} = {raw}: {best['mountPath']} should be mounted read-only")
        if key in REREAD_KEYS and "subPath" in best:
            problem(f"{key} = {raw}: mounted with subPath, so an updated Secret never reaches "
                    "the pod (the broker re-reads this file); mount the directory instead")
        rel = str(path.relative_to(best["mountPath"]))
        vol = volumes.get(best["name"], {})
        src = vol.get("configMap") or vol.get("secret")
        if src is not None:
            item_paths = [i["path"] for i in src.get("items", [])]
            if key == "policy.dir":
                cedar = [p for p in item_paths if p.startswith(rel + "/") and p.endswith(".cedar")]
                if not cedar:
                    problem(f"{key} = {raw}: no *.cedar file is mounted there")
            elif key.endswith("_dir") and rel == "." and not item_paths:
                pass  # a whole Secret as a directory (the signing key set)
            elif rel not in item_paths:
                problem(f"{key} = {raw}: volume {best['name']} maps no item to {rel!r} (items: {item_paths})")
        elif "emptyDir" in vol and not writable:
            # Only the SPIFFE CSI mode fills an emptyDir the broker reads: spiffe-helper writes it.
            if helper_conf is None or f'cert_dir = "{best["mountPath"]}"' not in helper_conf:
                problem(f"{key} = {raw}: {best['mountPath']} is an emptyDir nothing writes")
    # The chart's own ConfigMap must hold every key the config volume projects.
    cfg_vol = volumes.get("config", {}).get("configMap", {})
    for item in cfg_vol.get("items", []):
        if item["key"] not in cm_data:
            problem(f"config volume projects key {item['key']!r}, missing from the ConfigMap")
    projected = {i["key"] for i in cfg_vol.get("items", [])}
    for k in cm_data:
        if k.endswith(".cedar") and k not in projected:
            problem(f"policy {k} is in the ConfigMap but not mounted")


def check_node_id(broker: dict, sts: dict, claims: list[dict]) -> None:
    """Each replica writes its own audit chain under its own node id (the pod name),
    on its own persistent volume when persistence is on."""
    env = {e["name"]: e for e in broker.get("env", [])}
    ref = env.get("MAYFLY_NODE_ID", {}).get("valueFrom", {}).get("fieldRef", {})
    if ref.get("fieldPath") != "metadata.name":
        problem("MAYFLY_NODE_ID must come from the pod name (fieldRef metadata.name)")
    vols = {v["name"]: v for v in sts["spec"]["template"]["spec"].get("volumes", [])}
    if claims:
        if "data" in vols:
            problem("data is both a pod volume and a volumeClaimTemplate")
        if not any(c["metadata"]["name"] == "data" for c in claims):
            problem("persistence is on but no volumeClaimTemplate named data")
    elif "emptyDir" not in vols.get("data", {}):
        problem("without volumeClaimTemplates the data volume must be an emptyDir")


def url_port(url: str) -> int:
    rest = url.split("://", 1)[1]
    hostport = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if hostport.startswith("["):
        hostport = hostport.split("]", 1)[1]
    if ":" in hostport:
        return int(hostport.rsplit(":", 1)[1])
    return 80 if url.startswith("http://") else 443


def check_egress(cfg: dict, docs: list[dict]) -> None:
    """With egress restricted, the broker must still reach each configured provider."""
    providers = cfg.get("providers", {})
    needed = []
    if "vault" in providers:
        needed.append(("providers.vault.address", url_port(providers["vault"]["address"])))
    if "aws" in providers:
        needed.append(("providers.aws (STS, IAM)", 443))
        if "endpoint_url" in providers["aws"]:
            needed.append(("providers.aws.endpoint_url", url_port(providers["aws"]["endpoint_url"])))
    for np in (d for d in docs if d.get("kind") == "NetworkPolicy"):
        if "Egress" not in np["spec"].get("policyTypes", []):
            continue
        rules = np["spec"].get("egress") or []
        for what, port in needed:
            if not any(not r.get("ports") or any(p.get("port") == port and p.get("protocol", "TCP") == "TCP"
                                                  for p in r["ports"]) for r in rules):
                problem(f"{ident(np)} restricts egress but allows no TCP port {port} for {what}")


def check(rendered: str, expect: list[str], absent: list[str], policy_dir: str | None) -> None:
    docs = load(rendered)
    kinds = {d.get("kind") for d in docs}
    for k in expect:
        if k not in kinds:
            problem(f"expected a {k} in the output")
    for k in absent:
        if k in kinds:
            problem(f"expected no {k} in the output")

    dep = one(docs, "StatefulSet")
    cm = one(docs, "ConfigMap")
    if dep is None or cm is None:
        return
    tmpl = dep["spec"]["template"]
    pod = tmpl["spec"]
    pod_labels = tmpl["metadata"].get("labels", {})
    selects(dep["spec"]["selector"]["matchLabels"], pod_labels, ident(dep))
    for d in docs:
        sel = None
        if d["kind"] == "Service":
            sel = d["spec"].get("selector", {})
        elif d["kind"] == "PodDisruptionBudget":
            sel = d["spec"]["selector"].get("matchLabels", {})
        elif d["kind"] == "NetworkPolicy":
            sel = d["spec"]["podSelector"].get("matchLabels", {})
        elif d["kind"] == "HorizontalPodAutoscaler":
            ref = d["spec"]["scaleTargetRef"]
            if (ref.get("kind"), ref.get("name")) != ("StatefulSet", dep["metadata"]["name"]):
                problem(f"{ident(d)} scales {ref}, not {ident(dep)}")
            if "replicas" in dep["spec"]:
                problem(f"{ident(dep)} sets replicas although an HPA owns the count")
        if sel is not None:
            selects(sel, pod_labels, ident(d))

    containers = pod.get("containers", [])
    broker = next((c for c in containers if c.get("name") == "mayfly"), None)
    if broker is None:
        problem("no container named mayfly")
        return
    if broker.get("command") != EXPECTED_COMMAND:
        problem(f"broker command is {broker.get('command')}, expected {EXPECTED_COMMAND}")
    check_hardening(pod, containers + pod.get("initContainers", []))

    try:
        cfg = tomllib.loads(cm["data"]["mayfly.toml"])
    except (KeyError, tomllib.TOMLDecodeError) as e:
        problem(f"ConfigMap mayfly.toml does not parse as TOML: {e}")
        return
    check_keys(cfg)
    port = int(str(cfg.get("listen", "")).rsplit(":", 1)[-1])
    check_probes(broker, port)

    ann = tmpl["metadata"].get("annotations", {})
    if "prometheus.io/scrape" in ann:
        want = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                "prometheus.io/path": "/metrics", "prometheus.io/scheme": "https"}
        got = {k: ann.get(k) for k in want}
        if got != want:
            problem(f"Prometheus annotations {got}, expected {want}")
    if not ann.get("checksum/config"):
        problem("pod template lacks checksum/config: config changes would not roll the pods")

    helper_conf = cm["data"].get("spiffe-helper.conf")
    claims = dep["spec"].get("volumeClaimTemplates", [])
    check_mounts(cfg, broker, pod, cm["data"], helper_conf, claims)
    check_node_id(broker, dep, claims)
    check_egress(cfg, docs)

    if any(v.get("csi") for v in pod.get("volumes", [])):
        helpers = [c for c in pod.get("initContainers", []) if c.get("name") == "spiffe-helper"]
        if len(helpers) != 1 or helpers[0].get("restartPolicy") != "Always":
            problem("SPIFFE CSI mode needs spiffe-helper as a native sidecar (initContainer, restartPolicy: Always)")
        elif "startupProbe" not in helpers[0]:
            problem("spiffe-helper needs a startupProbe so the broker starts after the SVID is written")

    cedar = {k: v for k, v in cm["data"].items() if k.endswith(".cedar")}
    if not cedar:
        problem("no *.cedar policy in the ConfigMap (the broker refuses to start)")
    if policy_dir:
        for name, text in cedar.items():
            with open(PurePosixPath(policy_dir) / name, "w", encoding="utf-8") as f:
                f.write(text)


def reroot_config(rendered: str, out: str, root: str) -> None:
    cm = one(load(rendered), "ConfigMap")
    if cm is None:
        return
    text = cm["data"]["mayfly.toml"]
    listen = tomllib.loads(text)["listen"]
    moved = text.replace(f"listen = {json.dumps(listen)}", 'listen = "127.0.0.1:0"', 1)
    if moved == text:
        problem(f"cannot find `listen = {json.dumps(listen)}` in mayfly.toml to move it to 127.0.0.1:0")
        return
    text = moved
    # Every in-pod path the chart writes lives under one of these; the broker must
    # never touch the real ones on the machine running the test.
    for prefix in ("/etc/mayfly", "/var/run/mayfly", "/var/lib/mayfly"):
        text = text.replace(f'"{prefix}', f'"{root}{prefix}')
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    # What the pod's volumes would hold: every file and directory the config names
    # (placeholders: `mayfly config check` opens them, it does not parse them), the
    # policies from the ConfigMap, and the writable data directory.
    cfg = tomllib.loads(text)
    for key, path in named_files(cfg):
        p = Path(path)
        if key.endswith("_dir"):
            p.mkdir(parents=True, exist_ok=True)
            (p / "current.pem").write_text("placeholder\n", encoding="utf-8")
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("placeholder\n", encoding="utf-8")
    policy_dir = Path(cfg["policy"]["dir"])
    policy_dir.mkdir(parents=True, exist_ok=True)
    for name, body in cm["data"].items():
        if name.endswith(".cedar"):
            (policy_dir / name).write_text(body, encoding="utf-8")
    Path(cfg["audit"]["path"]).parent.mkdir(parents=True, exist_ok=True)
    if cfg["store"]["kind"] == "embedded":
        Path(cfg["store"]["path"]).parent.mkdir(parents=True, exist_ok=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("split")
    sp.add_argument("rendered")
    sp.add_argument("core_out")
    cp = sub.add_parser("check")
    cp.add_argument("rendered")
    cp.add_argument("--expect", action="append", default=[], metavar="KIND")
    cp.add_argument("--absent", action="append", default=[], metavar="KIND")
    cp.add_argument("--policy-dir")
    rp = sub.add_parser("config")
    rp.add_argument("rendered")
    rp.add_argument("out")
    rp.add_argument("root")
    args = parser.parse_args(argv)
    if args.command == "split":
        split(args.rendered, args.core_out)
    elif args.command == "config":
        reroot_config(args.rendered, args.out, args.root)
    else:
        check(args.rendered, args.expect, args.absent, args.policy_dir)
    for p in problems:
        print(f"  - {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
