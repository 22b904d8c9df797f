#!/usr/bin/env bash
# Check that the tests do not depend on their order: the whole suite in reverse file order, then each
# test file alone. Slow (about the suite's time twice over); not part of scripts/test.sh. Prints one
# line per run and a summary; exit status 1 when any run failed. With FILE arguments, only those
# files are run alone, in that order (the reverse-order run still covers the whole suite).
#   bash scripts/check_test_isolation.sh > isolation.log 2>&1 &
#   bash scripts/check_test_isolation.sh Testing/test_uncertainty.py Testing/test_refine_session.py
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=(.venv/bin/python -m pytest -q -p no:cacheprovider)
mapfile -t FILES < <(ls Testing/test_*.py | sort)
failed=()
mapfile -t REVERSED < <(printf '%s\n' "${FILES[@]}" | sort -r)
echo "== the suite in reverse file order"
if "${PYTEST[@]}" "${REVERSED[@]}" > /tmp/ikr_isolation_reverse.log 2>&1; then
  echo "reverse order: $(tail -1 /tmp/ikr_isolation_reverse.log)"
else
  echo "reverse order FAILED: $(tail -1 /tmp/ikr_isolation_reverse.log)"
  grep -E "^(FAILED|ERROR)" /tmp/ikr_isolation_reverse.log
  failed+=("reverse order")
fi
echo "== each test file alone"
ALONE=("${FILES[@]}")
[ "$#" -gt 0 ] && ALONE=("$@")
for file in "${ALONE[@]}"; do
  log=$(mktemp)
  "${PYTEST[@]}" "$file" > "$log" 2>&1
  status=$?
  # status 5: no tests collected (every test of the file skipped at collection) counts as a pass
  if [ "$status" -eq 0 ] || [ "$status" -eq 5 ]; then
    echo "$file: $(tail -1 "$log")"
  else
    echo "$file FAILED: $(tail -1 "$log")"
    grep -E "^(FAILED|ERROR)" "$log"
    failed+=("$file")
  fi
  rm -f "$log"
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all runs passed"
