#!/bin/sh
# Generate a self-signed CA and a SuperLink server certificate for the TLS overlay (docker-compose.tls.yml).
#
#   sh docker/gen-certs.sh OUT_DIR [EXTRA_SAN ...]
#
# OUT_DIR gets ca.crt, ca.key, server.pem, server.key. The server certificate is valid for the compose service
# name "superlink", "localhost" and 127.0.0.1, plus any EXTRA_SAN given as "DNS:host.example" or "IP:10.0.0.5"
# (the name or address the SuperNodes and `flwr run` use to reach the SuperLink). Existing files are kept, so
# re-running `docker compose up` does not rotate the certificates; delete OUT_DIR to make new ones.
# OWNER_UID (default 49999, the "app" user of the Flower images) owns the files, so the SuperLink can read its key.
set -eu
OUT="${1:?usage: gen-certs.sh OUT_DIR [EXTRA_SAN ...]}"
shift
DAYS="${CERT_DAYS:-365}"
OWNER_UID="${OWNER_UID:-49999}"
mkdir -p "$OUT"
if [ -s "$OUT/ca.crt" ] && [ -s "$OUT/server.pem" ] && [ -s "$OUT/server.key" ]; then
  echo "gen-certs: $OUT already has ca.crt, server.pem, server.key: kept"
  exit 0
fi
SAN="DNS:superlink,DNS:localhost,IP:127.0.0.1"
for extra in "$@"; do SAN="$SAN,$extra"; done
umask 077
openssl req -x509 -newkey rsa:3072 -sha256 -nodes -days "$DAYS" \
  -keyout "$OUT/ca.key" -out "$OUT/ca.crt" -subj "/CN=fedbayes-ca" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
openssl req -newkey rsa:3072 -sha256 -nodes -keyout "$OUT/server.key" -out "$OUT/server.csr" -subj "/CN=superlink"
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$SAN" > "$OUT/server.ext"
openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
  -out "$OUT/server.pem" -days "$DAYS" -sha256 -extfile "$OUT/server.ext"
rm -f "$OUT/server.csr" "$OUT/server.ext" "$OUT/ca.srl"
chmod 644 "$OUT/ca.crt" "$OUT/server.pem"
chmod 600 "$OUT/ca.key" "$OUT/server.key"
if [ "$(id -u)" = "0" ]; then chown "$OWNER_UID:$OWNER_UID" "$OUT"/*; fi
echo "gen-certs: wrote $OUT (server SAN: $SAN)"
