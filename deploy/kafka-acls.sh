#!/usr/bin/env bash
# Kafka ACLs for the sidecar's roles: one principal per role, each allowed only what its code
# does (README "Control-plane security"). Used by the compose stack's setup job
# (docker/kafka/setup.sh) and by hand on any cluster whose authorizer is on (KRaft:
# authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer) and denies what
# no ACL allows (allow.everyone.if.no.acl.found=false, the default).
#
#   BOOTSTRAP_SERVERS=broker:9092 COMMAND_CONFIG=admin.properties deploy/kafka-acls.sh
#
# COMMAND_CONFIG is the client config of a principal allowed to create ACLs (a super user).
# Every name below can be overridden from the environment; the defaults are the sidecar's config
# defaults (tests/test_kafka_acls.py checks that). Set SIDECAR_GROUP to your kafka.group_id.
# KAFKA_ACLS=echo prints the kafka-acls.sh commands instead of running them. Adding an ACL that
# exists is a no-op, so the script can run again; it never removes an ACL (list them with
# `kafka-acls.sh --list`). The consumers of the decisions topic need their own Read ACLs.
#
#   role        principal               writes                                   reads
#   operator    OPERATOR_PRINCIPAL      control                                  control, status, audit,
#               (`sidecar ctl`,                                                  reports, comparisons
#               report, replay)
#   sidecar     SIDECAR_PRINCIPAL       decisions, comparisons, dead letters,    requests (group
#                                       control (start-up barrier; `advance`,    SIDECAR_GROUP), control
#                                       all its key may sign), status, audit
#   aggregator  AGGREGATOR_PRINCIPAL    reports, partials, dead letters,         comparisons, partials
#               (guard)                 control (rollback, pause, verdict)       (groups AGGREGATOR_GROUP
#                                                                                and AGGREGATOR_GROUP.merge)
#   producer    PRODUCER_PRINCIPAL      requests (only if set)                   -
#
# Only those three principals may write the control topic, and only the sidecars the status and
# audit topics. The sidecar also reads the topic configs of the control topic (it refuses to
# start unless it is LogAppendTime) and of its output topics (their max.message.bytes):
# DescribeConfigs. Read and Write imply Describe. No principal gets All, no wildcard principal
# or resource, no Create, Delete, Alter or cluster operation: the topics are created by an admin.
set -euo pipefail

: "${BOOTSTRAP_SERVERS:?set BOOTSTRAP_SERVERS (host:port of the brokers)}"
KAFKA_ACLS="${KAFKA_ACLS:-kafka-acls.sh}"
COMMAND_CONFIG="${COMMAND_CONFIG:-}"

OPERATOR_PRINCIPAL="${OPERATOR_PRINCIPAL:-User:operator}"
SIDECAR_PRINCIPAL="${SIDECAR_PRINCIPAL:-User:sidecar}"
AGGREGATOR_PRINCIPAL="${AGGREGATOR_PRINCIPAL:-User:aggregator}"
PRODUCER_PRINCIPAL="${PRODUCER_PRINCIPAL:-}"

REQUESTS_TOPIC="${REQUESTS_TOPIC:-inference.requests}"
DECISIONS_TOPIC="${DECISIONS_TOPIC:-inference.decisions}"
COMPARISONS_TOPIC="${COMPARISONS_TOPIC:-inference.comparisons}"
DEAD_LETTER_TOPIC="${DEAD_LETTER_TOPIC:-inference.dead-letter}"
CONTROL_TOPIC="${CONTROL_TOPIC:-sidecar.control}"
STATUS_TOPIC="${STATUS_TOPIC:-$CONTROL_TOPIC.status}"
AUDIT_TOPIC="${AUDIT_TOPIC:-$CONTROL_TOPIC.audit}"
REPORTS_TOPIC="${REPORTS_TOPIC:-inference.reports}"
PARTIALS_TOPIC="${PARTIALS_TOPIC:-inference.window-partials}"
SIDECAR_GROUP="${SIDECAR_GROUP:-sidecar}"
AGGREGATOR_GROUP="${AGGREGATOR_GROUP:-sidecar-aggregator}"

fail() {
  echo "kafka-acls.sh: $*" >&2
  exit 2
}

check_principal() {  # <variable name>: Type:name, no wildcard, nothing a shell would split
  local value="${!1}"
  [[ "$value" =~ ^[A-Za-z]+:[A-Za-z0-9._@=,-]+$ ]] || fail "$1=$value is not a principal like User:name"
  [[ "$value" != *:\* ]] || fail "$1 must name one principal, not a wildcard"
}

check_name() {  # <variable name>: a literal topic or group name
  local value="${!1}"
  [[ "$value" =~ ^[A-Za-z0-9._-]+$ ]] || fail "$1=$value is not a literal topic or group name"
}

for var in OPERATOR_PRINCIPAL SIDECAR_PRINCIPAL AGGREGATOR_PRINCIPAL; do check_principal "$var"; done
[[ -z "$PRODUCER_PRINCIPAL" ]] || check_principal PRODUCER_PRINCIPAL
for var in REQUESTS_TOPIC DECISIONS_TOPIC COMPARISONS_TOPIC DEAD_LETTER_TOPIC CONTROL_TOPIC \
           STATUS_TOPIC AUDIT_TOPIC REPORTS_TOPIC PARTIALS_TOPIC SIDECAR_GROUP AGGREGATOR_GROUP; do
  check_name "$var"
done

# allow <principal> <Operation[,Operation...]> <topic|group>:<name>...
# One kafka-acls.sh call: every listed operation on every listed resource (literal names).
allow() {
  local principal="$1" operations="$2"
  shift 2
  local args=(--bootstrap-server "$BOOTSTRAP_SERVERS")
  [[ -z "$COMMAND_CONFIG" ]] || args+=(--command-config "$COMMAND_CONFIG")
  args+=(--add --allow-principal "$principal")
  local op resource
  IFS=, read -ra ops <<<"$operations"
  for op in "${ops[@]}"; do args+=(--operation "$op"); done
  for resource in "$@"; do args+=("--${resource%%:*}" "${resource#*:}"); done
  args+=(--resource-pattern-type literal)
  "$KAFKA_ACLS" "${args[@]}"
}

# operator: `sidecar ctl` writes commands and reads the control, status and audit topics (plain
# assigned consumers, no group); `sidecar report` reads reports, control and audit; `sidecar
# replay` reads comparisons.
allow "$OPERATOR_PRINCIPAL" Read,Write "topic:$CONTROL_TOPIC"
allow "$OPERATOR_PRINCIPAL" Read "topic:$STATUS_TOPIC" "topic:$AUDIT_TOPIC" \
  "topic:$REPORTS_TOPIC" "topic:$COMPARISONS_TOPIC"

# sidecar: consumes requests in its group; produces decisions, comparisons, dead letters; its
# control plane replays and tails the control topic (no group), writes its start-up barrier and
# signed `advance` commands there, and heartbeats and audit records to status and audit.
allow "$SIDECAR_PRINCIPAL" Read "topic:$REQUESTS_TOPIC" "group:$SIDECAR_GROUP"
allow "$SIDECAR_PRINCIPAL" Write,DescribeConfigs "topic:$DECISIONS_TOPIC" \
  "topic:$COMPARISONS_TOPIC" "topic:$DEAD_LETTER_TOPIC"
allow "$SIDECAR_PRINCIPAL" Read,Write,DescribeConfigs "topic:$CONTROL_TOPIC"
allow "$SIDECAR_PRINCIPAL" Write "topic:$STATUS_TOPIC" "topic:$AUDIT_TOPIC"

# aggregator: consumes comparisons in its group; writes reports, dead letters and its signed
# rollback/pause/verdict commands; with comparisons_key = "routing_key" it also writes partials
# and merges them in the group <group>.merge.
allow "$AGGREGATOR_PRINCIPAL" Read "topic:$COMPARISONS_TOPIC" "group:$AGGREGATOR_GROUP" \
  "group:$AGGREGATOR_GROUP.merge"
allow "$AGGREGATOR_PRINCIPAL" Read,Write "topic:$PARTIALS_TOPIC"
allow "$AGGREGATOR_PRINCIPAL" Write "topic:$REPORTS_TOPIC" "topic:$DEAD_LETTER_TOPIC" \
  "topic:$CONTROL_TOPIC"

# producer of requests (the compose stack's demo traffic); your real producers need the same.
if [[ -n "$PRODUCER_PRINCIPAL" ]]; then
  allow "$PRODUCER_PRINCIPAL" Write "topic:$REQUESTS_TOPIC"
fi
echo "kafka-acls.sh: ACLs in place for $OPERATOR_PRINCIPAL, $SIDECAR_PRINCIPAL, $AGGREGATOR_PRINCIPAL${PRODUCER_PRINCIPAL:+, $PRODUCER_PRINCIPAL}"
