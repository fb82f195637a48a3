#!/usr/bin/env bash
# Certificates for the TLS tests of the example clients, made with openssl
# into DIR: a CA (ca.pem), a server certificate for localhost and 127.0.0.1
# (server.pem, server.key) and a client certificate (client.pem,
# client.key), all signed by the CA, valid for two days.
set -euo pipefail
dir=$1
mkdir -p "$dir"
cd "$dir"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days 2 -subj /CN=batchgen-test-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > server.ext
printf 'extendedKeyUsage=clientAuth\n' > client.ext
for who in server client; do
  openssl req "${ec[@]}" -keyout "$who.key" -out "$who.csr" -subj "/CN=batchgen-test-$who" 2>/dev/null
  openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$who.pem" -days 2 \
    -extfile "$who.ext" 2>/dev/null
done
