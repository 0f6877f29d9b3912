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
# defaults (tests/test_kafka_acls.py checks that). Set SIDECAR_GROUP to your kafka.group_id and
# OUTCOMES_GROUP to your outcomes.group_id (it also names the outcomes stage's internal topics
# OUTCOMES_GROUP.by-task and OUTCOMES_GROUP.changelog, its router group OUTCOMES_GROUP.router,
# and, for comparisons keyed by routing key, its partials topic OUTCOMES_GROUP.partials (set
# OUTCOMES_PARTIALS_TOPIC if outcomes.partials_topic names another) and merge group
# OUTCOMES_GROUP.merge).
# KAFKA_ACLS=echo prints the kafka-acls.sh commands instead of running them. Adding an ACL that
# exists is a no-op, so the script can run again; it never removes an ACL (list them with
# `kafka-acls.sh --list`). The consumers of the decisions topic need their own Read ACLs.
#
#   role        principal               writes                                   reads
#   operator    OPERATOR_PRINCIPAL      control                                  control, status, audit,
#               (`sidecar ctl`, report,                                          reports, comparisons,
#               replay, outcomes status)                                         quality, verdicts
#   sidecar     SIDECAR_PRINCIPAL       decisions, comparisons, dead letters,    requests (group
#                                       control (start-up barrier; `advance`,    SIDECAR_GROUP), control
#                                       all its key may sign), status, audit
#   aggregator  AGGREGATOR_PRINCIPAL    reports, partials, dead letters,         comparisons, partials
#               (guard)                 control (rollback, pause, verdict)       (groups AGGREGATOR_GROUP
#                                                                                and AGGREGATOR_GROUP.merge)
#   outcomes    OUTCOMES_PRINCIPAL      quality, verdicts, dead letters,         comparisons + by-task
#               (`sidecar outcomes      control (quality rollback/pause,         (group OUTCOMES_GROUP),
#               run`, a guard key)      signed verdicts), by-task, changelog,    outcomes (group
#                                       outcomes partials                        OUTCOMES_GROUP.router),
#                                                                                changelog (no group),
#                                                                                outcomes partials (group
#                                                                                OUTCOMES_GROUP.merge)
#   producer    PRODUCER_PRINCIPAL      requests (only if set)                   -
#   outcome     OUTCOME_PRODUCER_       outcomes (only if set: your ground       -
#   producer    PRINCIPAL               truth, e.g. chargebacks)
#   versioned outputs, only those listed (see below):
#   sidecar     OUTPUT_VERSION_TOPICS   each version topic (+DescribeConfigs)    each version topic;
#                                                                                Describe READER_GROUPS
#   operator    OUTPUT_VERSION_TOPICS   -                                        decisions, each version
#                                                                                topic; Describe
#                                                                                READER_GROUPS
#
# Only the operator, aggregator, outcomes and sidecar principals may write the control topic, and
# only the sidecars the status and audit topics. The sidecar also reads the topic configs of the
# control topic (it refuses to start unless it is LogAppendTime) and of its output topics (their
# max.message.bytes): DescribeConfigs. Read and Write imply Describe. No principal gets All, no
# wildcard principal or resource, no Create, Delete, Alter or cluster operation: the topics are
# created by an admin. That includes the outcomes stage's internal topics: `sidecar outcomes run`
# creates OUTCOMES_GROUP.by-task and OUTCOMES_GROUP.changelog only when it cannot see them (its
# Read/Write imply Describe, so pre-created ones are seen and left alone), and then checks that
# both have as many partitions as the comparisons topic. Create them beforehand like
# docker/kafka/setup.sh does: partitions = those of the comparisons topic, the changelog with
# cleanup.policy=compact,delete and retention.ms = outcomes.changelog_retention_ms() (longest
# label window + report window + comparison lateness + outcome grace + extra retention; the
# stage does not check these configs on a topic that exists), the verdicts topic compacted.
# Without them it fails at start with "could not create topic ...: error 29" (not authorized).
# `sidecar outcomes run --create-topics` needs Create on every topic of the config: not granted.
#
# Versioned outputs (`[[outputs.versions]]`, README "Versioned outputs"): their topic names come
# only from your config and there may be none, so there is no default. List them in
# OUTPUT_VERSION_TOPICS (comma- or space-separated); the sidecar then gets Write and
# DescribeConfigs on each (it produces them and reads their max.message.bytes) and Read (its
# reader watch, outputs.readers_interval_s, fetches the last record each reader group committed
# past), and the operator Read on each and on the decisions topic (`sidecar deprecations status`
# looks at every version's topic, the current one included; `sidecar ctl sunset` counts the
# readers of the version it switches off and refuses while some remain). Who reads a version is
# seen through consumer groups: ListGroups only returns the groups a principal may Describe, and
# OffsetFetch and DescribeGroups need Describe on the group. The readers' groups are not known
# in advance, so list them in READER_GROUPS: the sidecar and the operator get Describe on each.
# A reader group left out is invisible: it is not counted as a reader (no error), so before a
# sunset make sure every consumer of the old topic is in READER_GROUPS (or run `sidecar
# deprecations status` and `ctl sunset` as a principal with Describe on all groups). The readers
# themselves need Read on their topic and group, like any consumer of the decisions topic.
set -euo pipefail

: "${BOOTSTRAP_SERVERS:?set BOOTSTRAP_SERVERS (host:port of the brokers)}"
KAFKA_ACLS="${KAFKA_ACLS:-kafka-acls.sh}"
COMMAND_CONFIG="${COMMAND_CONFIG:-}"

OPERATOR_PRINCIPAL="${OPERATOR_PRINCIPAL:-User:operator}"
SIDECAR_PRINCIPAL="${SIDECAR_PRINCIPAL:-User:sidecar}"
AGGREGATOR_PRINCIPAL="${AGGREGATOR_PRINCIPAL:-User:aggregator}"
OUTCOMES_PRINCIPAL="${OUTCOMES_PRINCIPAL:-User:outcomes}"
PRODUCER_PRINCIPAL="${PRODUCER_PRINCIPAL:-}"
OUTCOME_PRODUCER_PRINCIPAL="${OUTCOME_PRODUCER_PRINCIPAL:-}"

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
OUTCOMES_TOPIC="${OUTCOMES_TOPIC:-inference.outcomes}"
QUALITY_TOPIC="${QUALITY_TOPIC:-inference.quality}"
VERDICTS_TOPIC="${VERDICTS_TOPIC:-inference.quality-verdicts}"
OUTCOMES_GROUP="${OUTCOMES_GROUP:-sidecar-outcomes}"
# Named by the outcomes stage after its group (outcomes.group_id), not configurable on their own.
BY_TASK_TOPIC="$OUTCOMES_GROUP.by-task"
CHANGELOG_TOPIC="$OUTCOMES_GROUP.changelog"
ROUTER_GROUP="$OUTCOMES_GROUP.router"
MERGE_GROUP="$OUTCOMES_GROUP.merge"
OUTCOMES_PARTIALS_TOPIC="${OUTCOMES_PARTIALS_TOPIC:-$OUTCOMES_GROUP.partials}"
OUTPUT_VERSION_TOPICS="${OUTPUT_VERSION_TOPICS:-}"   # versioned outputs: no default (see above)
READER_GROUPS="${READER_GROUPS:-}"

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

split_names() {  # <variable name> <array name>: a list of literal names (comma or space)
  local value="${!1}" name
  local -a names
  local -n out="$2"
  out=()
  IFS=', ' read -ra names <<<"$value" || true
  for name in "${names[@]}"; do
    [[ -n "$name" ]] || continue
    [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || fail "$1: $name is not a literal topic or group name"
    out+=("$name")
  done
}

for var in OPERATOR_PRINCIPAL SIDECAR_PRINCIPAL AGGREGATOR_PRINCIPAL OUTCOMES_PRINCIPAL; do
  check_principal "$var"
done
[[ -z "$PRODUCER_PRINCIPAL" ]] || check_principal PRODUCER_PRINCIPAL
[[ -z "$OUTCOME_PRODUCER_PRINCIPAL" ]] || check_principal OUTCOME_PRODUCER_PRINCIPAL
for var in REQUESTS_TOPIC DECISIONS_TOPIC COMPARISONS_TOPIC DEAD_LETTER_TOPIC CONTROL_TOPIC \
           STATUS_TOPIC AUDIT_TOPIC REPORTS_TOPIC PARTIALS_TOPIC SIDECAR_GROUP AGGREGATOR_GROUP \
           OUTCOMES_TOPIC QUALITY_TOPIC VERDICTS_TOPIC OUTCOMES_GROUP OUTCOMES_PARTIALS_TOPIC; do
  check_name "$var"
done
split_names OUTPUT_VERSION_TOPICS OUTPUT_VERSION_TOPICS_LIST
split_names READER_GROUPS READER_GROUPS_LIST

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
# `sidecar report` and `sidecar outcomes status` read the quality reports and verdicts (no group).
allow "$OPERATOR_PRINCIPAL" Read "topic:$QUALITY_TOPIC" "topic:$VERDICTS_TOPIC"

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

# outcomes: the join consumes comparisons and the repartitioned outcomes (by-task) in its group
# and commits there; its router consumes the outcomes topic in OUTCOMES_GROUP.router and writes
# by-task (outcomes and heartbeats) and dead letters (bad outcomes); each task writes its store's
# changelog and replays it at start (assigned, no group); reports, verdicts and signed commands
# (quality rollback/pause, `verdict`) go to the quality, verdicts and control topics. With
# comparisons keyed by routing key each task writes quality partials, and the merge stage reads
# them back in OUTCOMES_GROUP.merge (and writes its merged records and barriers there). It
# reads no topic config and creates no topic that exists (see above).
allow "$OUTCOMES_PRINCIPAL" Read "topic:$COMPARISONS_TOPIC" "topic:$OUTCOMES_TOPIC" \
  "group:$OUTCOMES_GROUP" "group:$ROUTER_GROUP" "group:$MERGE_GROUP"
allow "$OUTCOMES_PRINCIPAL" Read,Write "topic:$BY_TASK_TOPIC" "topic:$CHANGELOG_TOPIC" \
  "topic:$OUTCOMES_PARTIALS_TOPIC"
allow "$OUTCOMES_PRINCIPAL" Write "topic:$QUALITY_TOPIC" "topic:$VERDICTS_TOPIC" \
  "topic:$DEAD_LETTER_TOPIC" "topic:$CONTROL_TOPIC"

# Versioned outputs (only if listed, see above): the sidecar produces each version's topic and
# its reader watch reads them; `sidecar deprecations status` (operator) reads every version's
# topic, the current one too; both see the listed readers' groups.
if ((${#OUTPUT_VERSION_TOPICS_LIST[@]})); then
  version_topics=("${OUTPUT_VERSION_TOPICS_LIST[@]/#/topic:}")
  allow "$SIDECAR_PRINCIPAL" Read,Write,DescribeConfigs "${version_topics[@]}"
  allow "$OPERATOR_PRINCIPAL" Read "topic:$DECISIONS_TOPIC" "${version_topics[@]}"
fi
if ((${#READER_GROUPS_LIST[@]})); then
  reader_groups=("${READER_GROUPS_LIST[@]/#/group:}")
  allow "$SIDECAR_PRINCIPAL" Describe "${reader_groups[@]}"
  allow "$OPERATOR_PRINCIPAL" Describe "${reader_groups[@]}"
fi

# producers of requests (the compose stack's demo traffic) and of outcomes (ground truth); your
# real producers need the same.
if [[ -n "$PRODUCER_PRINCIPAL" ]]; then
  allow "$PRODUCER_PRINCIPAL" Write "topic:$REQUESTS_TOPIC"
fi
if [[ -n "$OUTCOME_PRODUCER_PRINCIPAL" ]]; then
  allow "$OUTCOME_PRODUCER_PRINCIPAL" Write "topic:$OUTCOMES_TOPIC"
fi
echo "kafka-acls.sh: ACLs in place for $OPERATOR_PRINCIPAL, $SIDECAR_PRINCIPAL," \
  "$AGGREGATOR_PRINCIPAL, $OUTCOMES_PRINCIPAL${PRODUCER_PRINCIPAL:+, $PRODUCER_PRINCIPAL}${OUTCOME_PRODUCER_PRINCIPAL:+, $OUTCOME_PRODUCER_PRINCIPAL}"
