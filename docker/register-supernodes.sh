#!/bin/sh
# Register SuperNode public keys with a SuperLink that runs with --enable-supernode-auth (the one-shot
# "register-supernodes" service of docker-compose.auth.yml; also usable by hand).
#
#   sh docker/register-supernodes.sh SUPERLINK_ADDRESS CA_CERT PUBLIC_KEY...
#   sh docker/register-supernodes.sh superlink:8000 /app/certs/ca.crt /app/certs/supernode-0.pub ...
#
# It writes a Flower connection "fedbayes" (address SUPERLINK_ADDRESS, TLS verified with CA_CERT) to
# $FLWR_HOME/config.toml (default /tmp/flwr-register) and runs `flwr supernode register KEY fedbayes` per key.
# A key that is already registered counts as done, so the service may run on every `docker compose up`.
set -eu
LINK="${1:?usage: register-supernodes.sh SUPERLINK_ADDRESS CA_CERT PUBLIC_KEY...}"
CA="${2:?usage: register-supernodes.sh SUPERLINK_ADDRESS CA_CERT PUBLIC_KEY...}"
shift 2
[ "$#" -gt 0 ] || { echo "register-supernodes: no public key given" >&2; exit 2; }
export FLWR_HOME="${FLWR_HOME:-/tmp/flwr-register}"
export FLWR_DISABLE_UPDATE_CHECK=1
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "fedbayes"

[superlink.fedbayes]
address = "$LINK"
root-certificates = "$CA"
TOML
for key in "$@"; do
  tries=0
  while :; do
    out="$(flwr supernode register "$key" fedbayes --format json 2>&1)" || true
    case "$out" in
      *'"success": true'*)
        echo "register-supernodes: $key registered: $(echo "$out" | tr -d '\n ' | sed 's/.*"node-id":\([0-9]*\).*/node id \1/')"
        break ;;
      *"already in use"*)
        echo "register-supernodes: $key was registered before"
        break ;;
    esac
    tries=$((tries + 1))
    if [ "$tries" -ge 5 ]; then
      echo "register-supernodes: cannot register $key:" >&2
      echo "$out" >&2
      exit 1
    fi
    sleep 2
  done
done
