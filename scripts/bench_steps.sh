# Sourced by scripts/bench.sh: run each benchmark as a step that may fail without stopping the
# others; `bench_summary` then lists the failed ones and returns non-zero if any failed.
LLMT_BENCH_FAILED=()

# bench_step TITLE COMMAND [ARGS...]: print the title, run the command in a subshell (a failing
# one, or one that exits the shell, is only recorded).
bench_step() {
  local title="$1"
  shift
  echo "== $title =="
  if ! ( "$@" ); then
    echo "!! FAILED: $title"
    LLMT_BENCH_FAILED+=("$title")
  fi
}

bench_summary() {
  if [ ${#LLMT_BENCH_FAILED[@]} -eq 0 ]; then
    echo "== every benchmark ran =="
    return 0
  fi
  echo "== ${#LLMT_BENCH_FAILED[@]} benchmark(s) failed =="
  local title
  for title in "${LLMT_BENCH_FAILED[@]}"; do
    echo "  - $title"
  done
  return 1
}
