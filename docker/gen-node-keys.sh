#!/bin/sh
# Generate the SuperNode authentication key pairs for the auth overlay (docker-compose.auth.yml).
#
#   sh docker/gen-node-keys.sh OUT_DIR [COUNT]
#
# OUT_DIR gets supernode-0, supernode-0.pub, ... supernode-<COUNT-1>(.pub) (COUNT defaults to 3): ECDSA P-384
# key pairs in the OpenSSH formats Flower 1.42 reads (`flower-supernode --auth-supernode-private-key supernode-0`,
# `flwr supernode register supernode-0.pub`). Existing pairs are kept, so re-running `docker compose up` does
# not rotate them (a new key would have to be registered again); delete a pair to replace it.
# OWNER_UID (default 49999, the "app" user of the Flower images) owns the files, so each SuperNode can read its key.
set -eu
OUT="${1:?usage: gen-node-keys.sh OUT_DIR [COUNT]}"
COUNT="${2:-3}"
OWNER_UID="${OWNER_UID:-49999}"
command -v ssh-keygen >/dev/null || { echo "gen-node-keys: ssh-keygen is needed (apk add openssh-keygen)" >&2; exit 1; }
mkdir -p "$OUT"
umask 077
i=0
while [ "$i" -lt "$COUNT" ]; do
  key="$OUT/supernode-$i"
  if [ -s "$key" ] && [ -s "$key.pub" ]; then
    echo "gen-node-keys: $key kept"
  else
    rm -f "$key" "$key.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedbayes-supernode-$i" -f "$key"
    echo "gen-node-keys: wrote $key and $key.pub"
  fi
  chmod 600 "$key"
  chmod 644 "$key.pub"
  if [ "$(id -u)" = "0" ]; then chown "$OWNER_UID:$OWNER_UID" "$key" "$key.pub"; fi
  i=$((i + 1))
done
