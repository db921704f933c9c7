#!/usr/bin/env bash
# Make a private CA and a server certificate for hubproxy, signed by it.
#   bash certs/make-self-signed.sh mirror.example.lan [more names or IPs...]
# Writes into certs/: ca.pem + ca-key.pem (keep the key private), server.pem + server-key.pem.
# Clients trust ca.pem (see certs/README.md); hubproxy runs with
#   python -m hubproxy --cert certs/server.pem --key certs/server-key.pem
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 HOSTNAME [NAME-OR-IP...]" >&2
    exit 2
fi
cd "$(dirname "$0")"
san=""
for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then
        san+="IP:$name,"
    else
        san+="DNS:$name,"
    fi
done
san=${san%,}
if [ ! -f ca.pem ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
        -subj "/CN=hubproxy private CA" -keyout ca-key.pem -out ca.pem \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
fi
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$1" -keyout server-key.pem -out server.csr
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 825 \
    -out server.pem -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san")
rm -f server.csr ca.srl
chmod 600 ca-key.pem server-key.pem
echo "wrote $(pwd)/server.pem and server-key.pem for $san, signed by $(pwd)/ca.pem"
