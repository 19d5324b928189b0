# Sourced by the bench scripts: draws their PNG charts with gnuplot (scripts/setup installs
# gnuplot-nox). The charts go to $CHARTS (default target/bench-charts; `CHARTS=docs/bench`
# refreshes the README's pictures).
CHARTS=${CHARTS:-target/bench-charts}
CHART_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# chart SCRIPT OUT [NAME=VALUE...]: runs scripts/charts/SCRIPT.gp with `out` and each NAME set
# to its (string) VALUE, and says where the picture is.
chart() {
  local script=$1 out=$2 args=()
  shift 2
  mkdir -p "$(dirname "$out")"
  args+=(-e "out='$out'")
  local kv
  for kv in "$@"; do args+=(-e "${kv%%=*}='${kv#*=}'"); done
  if gnuplot "${args[@]}" "$CHART_DIR/$script.gp"; then
    log "chart: $out"
  else
    log "chart $out could not be drawn (gnuplot failed; the tables above stand)"
  fi
}
