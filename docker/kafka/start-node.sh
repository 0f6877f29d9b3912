#!/usr/bin/env bash
# Entrypoint of one Kafka node of docker/compose.yaml (apache/kafka:3.9.0, replacing the image's
# own launcher, whose storage format cannot add SCRAM credentials).
#
#   NODE_ID             this node's id (1, 2, 3); it is reached as kafka-$NODE_ID
#   CLUSTER_ID          the same on every node
#   SASL_ADMIN_PASSWORD the super user `admin`'s password (docker/.env), used by the brokers
#                       between themselves and by the setup job
#
# 1. A private copy (mode 600, in the container only) of the mounted server.properties plus this
#    node's id, its advertised listener and the SASL login settings, which hold the password.
# 2. Format the storage on first start, adding admin's SCRAM-SHA-512 credential to the metadata
#    log (KIP-900: the inter-broker user must exist before the brokers start; the role users are
#    created later by the setup job). An already formatted volume is left as it is.
# 3. An admin client config for the healthcheck and exec Kafka.
set -euo pipefail

: "${NODE_ID:?NODE_ID is not set}"
: "${CLUSTER_ID:?CLUSTER_ID is not set}"
: "${SASL_ADMIN_PASSWORD:?SASL_ADMIN_PASSWORD is not set (docker/.env, see .env.example)}"
BASE_CONFIG="${BASE_CONFIG:-/opt/sidecar/kafka/server.properties}"
RUNTIME_DIR="${RUNTIME_DIR:-/tmp/kafka-node}"
KAFKA_BIN="${KAFKA_BIN:-/opt/kafka/bin}"

# Passwords go into JAAS strings and SCRAM specs ([name=...,password=...]): quotes, commas,
# brackets or backslashes would break them, and a short one is a placeholder left in place.
if [[ ! "$SASL_ADMIN_PASSWORD" =~ ^[A-Za-z0-9_-]{16,}$ ]]; then
  echo "SASL_ADMIN_PASSWORD must be at least 16 characters of A-Z a-z 0-9 _ - (e.g." \
    "python3 -c 'import secrets; print(secrets.token_urlsafe(24))')" >&2
  exit 2
fi

umask 077
mkdir -p "$RUNTIME_DIR"
config="$RUNTIME_DIR/server.properties"
{
  cat "$BASE_CONFIG"
  echo
  echo "# added by start-node.sh"
  echo "node.id=$NODE_ID"
  echo "advertised.listeners=SASL_PLAINTEXT://kafka-$NODE_ID:9092"
  echo "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"admin\" password=\"$SASL_ADMIN_PASSWORD\";"
  echo "listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username=\"admin\" password=\"$SASL_ADMIN_PASSWORD\" user_admin=\"$SASL_ADMIN_PASSWORD\";"
} >"$config"

cat >"$RUNTIME_DIR/admin.properties" <<EOF
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$SASL_ADMIN_PASSWORD";
EOF

"$KAFKA_BIN/kafka-storage.sh" format --ignore-formatted --cluster-id "$CLUSTER_ID" \
  --config "$config" --add-scram "SCRAM-SHA-512=[name=admin,password=$SASL_ADMIN_PASSWORD]"

exec "$KAFKA_BIN/kafka-server-start.sh" "$config"
