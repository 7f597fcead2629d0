#!/usr/bin/env bash
# Run a pytest selection ROUNDS times while a CPU burner keeps every core busy, and say how many rounds passed.
# A test that fails even once here is a flake to fix (see docs/testing.md).
#
#   tests/flake_hunt.sh                          # tests/contract tests/fault tests/e2e, 10 rounds
#   tests/flake_hunt.sh -n 20 tests/contract/test_store_contract.py -k one_winner
#   tests/flake_hunt.sh -n 3 -b 0 tests          # whole suite, no burners
#
# Options: -n ROUNDS (default 10), -b BURNERS (default: one per core), -o DIR (logs; default a new temp dir).
# Everything after the options goes to pytest. Exit status: 0 when every round passed, 1 otherwise.
set -u -o pipefail

cd "$(dirname "$0")/.."
rounds=10
burners=$(nproc 2>/dev/null || echo 2)
log_dir=""
while getopts "n:b:o:h" opt; do
  case "$opt" in
    n) rounds=$OPTARG ;;
    b) burners=$OPTARG ;;
    o) log_dir=$OPTARG ;;
    *) sed -n '2,10p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [ "$#" -eq 0 ]; then
  set -- tests/contract tests/fault tests/e2e
fi
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
if [ -z "$log_dir" ]; then
  log_dir=$(mktemp -d "${TMPDIR:-/tmp}/flake-hunt.XXXXXX")
fi
mkdir -p "$log_dir"

burner_pids=()
stop_burners() {
  # Only the burners this script started, by PID.
  if [ "${#burner_pids[@]}" -gt 0 ]; then
    kill "${burner_pids[@]}" 2>/dev/null
    wait "${burner_pids[@]}" 2>/dev/null
    burner_pids=()
  fi
}
trap stop_burners EXIT
trap 'exit 130' INT TERM

for _ in $(seq 1 "$burners"); do
  "$python" -c 'while True: pass' &
  burner_pids+=("$!")
done

echo "flake hunt: $rounds rounds of pytest $*, $burners CPU burners, logs in $log_dir"
passed=0
failed=0
for round in $(seq 1 "$rounds"); do
  log="$log_dir/round-$round.log"
  # Each round's tmp dirs (the servers' and workers' logs) live beside its log: pytest keeps only its last three
  # base dirs, and other pytest runs on the machine would rotate a failed round's away. Kept only for failures.
  basetemp="$log_dir/round-$round.tmp"
  start=$(date +%s)
  if HF_HUB_OFFLINE=1 "$python" -m pytest -q -p no:cacheprovider --basetemp "$basetemp" "$@" >"$log" 2>&1; then
    passed=$((passed + 1))
    rm -rf "$basetemp"
    echo "round $round: passed ($(( $(date +%s) - start )) s)"
  else
    failed=$((failed + 1))
    echo "round $round: FAILED ($(( $(date +%s) - start )) s), $log, tmp dirs in $basetemp"
    grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/  /'
  fi
done
echo "flake hunt summary: $passed/$rounds rounds passed, $failed failed ($*)"
[ "$failed" -eq 0 ]
