#!/usr/bin/env bash
# Make a private CA and a server certificate for hubproxy, signed by it, in the current directory:
#   bash make-self-signed.sh mirror.lan [more names or IPs...]
# Writes ca.pem + ca-key.pem (the CA: clients trust ca.pem, keep ca-key.pem private) and
# server.pem + server-key.pem, the names hubproxy.toml and the README's service steps use
# (/etc/hubproxy/server.pem, /etc/hubproxy/server-key.pem). A ca.pem already here is reused, so a
# renewed server certificate needs no change on the clients.
# Installed with hubproxy next to its systemd unit (hubproxy/service/); certs/make-self-signed.sh
# in the repository is a link to it.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash make-self-signed.sh HOSTNAME [NAME-OR-IP...] (writes ca.pem, ca-key.pem, server.pem and server-key.pem here)" >&2
    exit 2
fi
if ! command -v openssl >/dev/null 2>&1; then
    echo "make-self-signed.sh: needs the openssl command (apt install openssl, opkg install openssl-util)" >&2
    exit 1
fi
san=""
for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then
        san+="IP:$name,"
    else
        san+="DNS:$name,"
    fi
done
san=${san%,}
here=$(pwd)
# openssl chatters on success; show what it said only when a step fails
quiet() {
    local said
    if ! said=$("$@" 2>&1); then
        echo "make-self-signed.sh: openssl failed in $here: ${said//$'\n'/ }" >&2
        exit 1
    fi
}
if [ ! -f ca.pem ]; then
    quiet openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
        -subj "/CN=hubproxy private CA" -keyout ca-key.pem -out ca.pem \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
fi
quiet openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$1" -keyout server-key.pem -out server.csr
quiet openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 825 \
    -out server.pem -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san")
rm -f server.csr ca.srl
chmod 600 ca-key.pem server-key.pem
echo "wrote $here/server.pem and $here/server-key.pem for $san (825 days), signed by $here/ca.pem"
echo "serve with: hubproxy --cert $here/server.pem --key $here/server-key.pem; clients trust $here/ca.pem (hubproxy print-config CLIENT --url https://$1 --ca $here/ca.pem)"
