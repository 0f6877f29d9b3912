#!/usr/bin/env bash
# The one-shot `setup` job of docker/compose.yaml, as the super user `admin`: the SCRAM users of
# the roles, the topics, the ACLs (deploy/kafka-acls.sh). Every step is idempotent, and the job
# runs again on every `docker compose up`, so a password changed in docker/.env takes effect
# then (restart the service that uses it).
#
#   SASL_ADMIN_PASSWORD, SASL_OPERATOR_PASSWORD, SASL_SIDECAR_PASSWORD,
#   SASL_AGGREGATOR_PASSWORD, SASL_TRAFFIC_PASSWORD,
#   SASL_OUTCOMES_PASSWORD                            from docker/.env (see .env.example)
#   OUTCOMES_CHANGELOG_RETENTION_MS                   from compose.yaml (see below)
#
# Users: `operator` (sidecar ctl), `sidecar` (the sidecar replicas), `aggregator` (the guard),
# `traffic` (the demo producer), `outcomes` (the outcomes stage). `admin` exists from the
# brokers' storage format (start-node.sh); it is the only super user.
set -euo pipefail

BOOTSTRAP_SERVERS="${BOOTSTRAP_SERVERS:-kafka-1:9092,kafka-2:9092,kafka-3:9092}"
KAFKA_BIN="${KAFKA_BIN:-/opt/kafka/bin}"
ACLS_SCRIPT="${ACLS_SCRIPT:-/opt/sidecar/kafka-acls.sh}"
RUNTIME_DIR="${RUNTIME_DIR:-/tmp/sidecar-setup}"
PARTITIONS="${PARTITIONS:-6}"
REPLICATION_FACTOR="${REPLICATION_FACTOR:-3}"
MIN_INSYNC_REPLICAS="${MIN_INSYNC_REPLICAS:-2}"

# Topic and group names (the sidecar's config defaults; docker/sidecar.toml uses them), shared
# with deploy/kafka-acls.sh.
export REQUESTS_TOPIC="${REQUESTS_TOPIC:-inference.requests}"
export DECISIONS_TOPIC="${DECISIONS_TOPIC:-inference.decisions}"
export COMPARISONS_TOPIC="${COMPARISONS_TOPIC:-inference.comparisons}"
export DEAD_LETTER_TOPIC="${DEAD_LETTER_TOPIC:-inference.dead-letter}"
export CONTROL_TOPIC="${CONTROL_TOPIC:-sidecar.control}"
export STATUS_TOPIC="${STATUS_TOPIC:-$CONTROL_TOPIC.status}"
export AUDIT_TOPIC="${AUDIT_TOPIC:-$CONTROL_TOPIC.audit}"
export REPORTS_TOPIC="${REPORTS_TOPIC:-inference.reports}"
export PARTIALS_TOPIC="${PARTIALS_TOPIC:-inference.window-partials}"
export SIDECAR_GROUP="${SIDECAR_GROUP:-sidecar}"
export AGGREGATOR_GROUP="${AGGREGATOR_GROUP:-sidecar-aggregator}"
export OUTCOMES_TOPIC="${OUTCOMES_TOPIC:-inference.outcomes}"
export QUALITY_TOPIC="${QUALITY_TOPIC:-inference.quality}"
export VERDICTS_TOPIC="${VERDICTS_TOPIC:-inference.quality-verdicts}"
export OUTCOMES_GROUP="${OUTCOMES_GROUP:-sidecar-outcomes}"
# The outcomes stage's internal topics, named after its group (sidecar/outcomes/settings.py).
BY_TASK_TOPIC="$OUTCOMES_GROUP.by-task"
CHANGELOG_TOPIC="$OUTCOMES_GROUP.changelog"
export OUTCOMES_PARTIALS_TOPIC="${OUTCOMES_PARTIALS_TOPIC:-$OUTCOMES_GROUP.partials}"
# The changelog's retention.ms: outcomes.changelog_retention_ms() of docker/sidecar.toml (the
# longest label window + report window + comparison lateness + outcome grace + extra
# retention). No default: a changelog that drops records younger than a label window loses the
# requests still waiting for their outcome when a store is rebuilt from it.
OUTCOMES_CHANGELOG_RETENTION_MS="${OUTCOMES_CHANGELOG_RETENTION_MS:-}"
if [[ ! "$OUTCOMES_CHANGELOG_RETENTION_MS" =~ ^[1-9][0-9]*$ ]]; then
  echo "setup: OUTCOMES_CHANGELOG_RETENTION_MS must be the outcomes changelog's retention in" \
    "ms (python -c 'from sidecar.config import load_config as l;" \
    "print(l(\"docker/sidecar.toml\").outcomes.changelog_retention_ms())')" >&2
  exit 2
fi

USERS=(operator sidecar aggregator traffic outcomes)

password_of() {  # <user>: the value of SASL_<USER>_PASSWORD, checked
  local var="SASL_${1^^}_PASSWORD"
  local value="${!var:-}"
  # Goes into a JAAS string and a SCRAM spec ([iterations=...,password=...]): no quotes, commas,
  # brackets or backslashes; a short one is a placeholder left in place.
  if [[ ! "$value" =~ ^[A-Za-z0-9_-]{16,}$ ]]; then
    echo "setup: $var must be at least 16 characters of A-Z a-z 0-9 _ - (e.g." \
      "python3 -c 'import secrets; print(secrets.token_urlsafe(24))')" >&2
    exit 2
  fi
  printf '%s' "$value"
}

admin_password="$(password_of admin)"
for user in "${USERS[@]}"; do password_of "$user" >/dev/null; done

umask 077
mkdir -p "$RUNTIME_DIR"
admin_config="$RUNTIME_DIR/admin.properties"
cat >"$admin_config" <<EOF
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$admin_password";
EOF
as_admin=(--bootstrap-server "$BOOTSTRAP_SERVERS" --command-config "$admin_config")

echo "== SCRAM users: ${USERS[*]}"
for user in "${USERS[@]}"; do
  "$KAFKA_BIN/kafka-configs.sh" "${as_admin[@]}" --alter --entity-type users --entity-name "$user" \
    --add-config "SCRAM-SHA-512=[iterations=8192,password=$(password_of "$user")]"
done

echo "== topics"
create() {  # <topic> <partitions> [--config k=v ...]
  "$KAFKA_BIN/kafka-topics.sh" "${as_admin[@]}" --create --if-not-exists --topic "$1" \
    --partitions "$2" --replication-factor "$REPLICATION_FACTOR" \
    --config "min.insync.replicas=$MIN_INSYNC_REPLICAS" "${@:3}"
}
for topic in "$REQUESTS_TOPIC" "$DECISIONS_TOPIC" "$COMPARISONS_TOPIC" "$DEAD_LETTER_TOPIC" \
             "$REPORTS_TOPIC" "$PARTIALS_TOPIC" "$STATUS_TOPIC" "$AUDIT_TOPIC" \
             "$OUTCOMES_TOPIC" "$QUALITY_TOPIC"; do
  create "$topic" "$PARTITIONS"
done
# The outcomes stage: the latest verdict per rollout counts (compacted, keyed by rollout); its
# internal topics with as many partitions as the comparisons topic (partition p of each is one
# task: the stage refuses to start otherwise), the store's changelog compacted and kept past the
# longest label window. The stage's user may not create topics (deploy/kafka-acls.sh) and does
# not check the configs of topics that exist: they are set again here in case they changed.
create "$VERDICTS_TOPIC" "$PARTITIONS" --config cleanup.policy=compact
create "$BY_TASK_TOPIC" "$PARTITIONS"
# Quality partials (comparisons keyed by routing key): compacted, the merge stage's whole state.
create "$OUTCOMES_PARTIALS_TOPIC" "$PARTITIONS" --config cleanup.policy=compact
create "$CHANGELOG_TOPIC" "$PARTITIONS" --config cleanup.policy=compact,delete \
  --config "retention.ms=$OUTCOMES_CHANGELOG_RETENTION_MS"
"$KAFKA_BIN/kafka-configs.sh" "${as_admin[@]}" --alter --entity-type topics \
  --entity-name "$VERDICTS_TOPIC" --add-config cleanup.policy=compact
"$KAFKA_BIN/kafka-configs.sh" "${as_admin[@]}" --alter --entity-type topics \
  --entity-name "$CHANGELOG_TOPIC" \
  --add-config "cleanup.policy=[compact,delete],retention.ms=$OUTCOMES_CHANGELOG_RETENTION_MS"
# The control topic: ONE partition (every instance applies commands in the same order),
# infinite retention (instances replay it at start), and the broker's append time on every
# record (command freshness is judged by a time no producer chooses: instances refuse to start
# otherwise). The config is set again in case the topic existed without it.
create "$CONTROL_TOPIC" 1 --config message.timestamp.type=LogAppendTime \
  --config retention.ms=-1 --config retention.bytes=-1
"$KAFKA_BIN/kafka-configs.sh" "${as_admin[@]}" --alter --entity-type topics \
  --entity-name "$CONTROL_TOPIC" \
  --add-config message.timestamp.type=LogAppendTime,retention.ms=-1,retention.bytes=-1
"$KAFKA_BIN/kafka-configs.sh" "${as_admin[@]}" --describe --entity-type topics \
  --entity-name "$CONTROL_TOPIC" | grep -q 'message.timestamp.type=LogAppendTime' \
  || { echo "setup: $CONTROL_TOPIC is not LogAppendTime" >&2; exit 1; }

echo "== ACLs"
KAFKA_ACLS="$KAFKA_BIN/kafka-acls.sh" BOOTSTRAP_SERVERS="$BOOTSTRAP_SERVERS" \
  COMMAND_CONFIG="$admin_config" OPERATOR_PRINCIPAL=User:operator \
  SIDECAR_PRINCIPAL=User:sidecar AGGREGATOR_PRINCIPAL=User:aggregator \
  OUTCOMES_PRINCIPAL=User:outcomes PRODUCER_PRINCIPAL=User:traffic bash "$ACLS_SCRIPT"
"$KAFKA_BIN/kafka-acls.sh" "${as_admin[@]}" --list
echo "setup done"
