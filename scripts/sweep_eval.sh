#!/usr/bin/env bash
# Accuracy vs memory size: runs `longllama eval TASK` for every model and memory size over the
# seeds, appends one CSV row per (model, tokens) (seeds separated by ";"), and draws one PNG per
# task with gnuplot.
#
#   scripts/sweep_eval.sh [-t dictionary|passkey] [-n "1024 16384 ..."] [-s 1,2,3,4,5] [-k 32]
#                         [-o OUTDIR] [-b BUILD_DIR] [-x "extra eval flags"] MODEL [MODEL...]
#
# Defaults: dictionary, N = 1k 16k 256k 1M 4M 16M, seeds 1..5, top-k 32 (the paper's k for the
# dictionary task; -k 0 = dense), output in sweep-out/. Rows already in the CSV are skipped, so an
# interrupted sweep resumes. Needs gnuplot for the plot (Debian: apt-get install gnuplot-nox);
# without it the CSV is still written.
set -euo pipefail

task=dictionary
sizes="1024 16384 262144 1048576 4194304 16777216"
seeds=1,2,3,4,5
topk=32
out=sweep-out
build=""
extra=""
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while getopts "t:n:s:k:o:b:x:h" opt; do
  case $opt in
    t) task=$OPTARG ;;
    n) sizes=$OPTARG ;;
    s) seeds=$OPTARG ;;
    k) topk=$OPTARG ;;
    o) out=$OPTARG ;;
    b) build=$OPTARG ;;
    x) extra=$OPTARG ;;
    h) usage 0 ;;
    *) usage 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "sweep_eval.sh: give at least one model" >&2; usage 2; }
case $task in dictionary|passkey) ;; *) echo "sweep_eval.sh: -t must be dictionary or passkey" >&2; exit 2 ;; esac

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$build" ]; then
  for d in build build-tasks; do [ -x "$root/$d/longllama" ] && { build=$root/$d; break; }; done
fi
cli=${build:+$build/longllama}
[ -n "$cli" ] && [ -x "$cli" ] || { echo "sweep_eval.sh: no longllama binary (build it, or pass -b BUILD_DIR)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "sweep_eval.sh: needs python3 to read the JSON" >&2; exit 2; }

mkdir -p "$out"
csv=$out/$task.csv
[ -s "$csv" ] || echo "task,model,tokens,top_k,seeds,accuracy,min,max,ingest_tokens_per_s,peak_rss_bytes,memory_bytes" > "$csv"

for model in "$@"; do
  name=$(basename "$model")
  [ "$name" = model ] && name=$(basename "$(dirname "$model")")
  for n in $sizes; do
    if grep -q "^$task,$name,$n,$topk," "$csv"; then echo "skip $name N=$n (in $csv)" >&2; continue; fi
    echo "== $task $name N=$n seeds $seeds top-k $topk" >&2
    # shellcheck disable=SC2086
    json=$("$cli" eval "$task" -m "$model" --tokens "$n" --seeds "$seeds" --top-k "$topk" --json $extra)
    python3 - "$json" "$task" "$name" "$n" "$topk" "$seeds" >> "$csv" <<'PY'
import json, sys
j = json.loads(sys.argv[1])
task, name, n, k, seeds = sys.argv[2:7]
print(",".join(str(x) for x in [task, name, n, k, seeds.replace(",", ";"), j["accuracy"], j["min"], j["max"],
                                  round(j["ingest_tokens_per_s"]), j["peak_rss_bytes"], j["memory_bytes"]]))
PY
    tail -1 "$csv" >&2
  done
done

if ! command -v gnuplot >/dev/null; then
  echo "sweep_eval.sh: gnuplot not found, no plot drawn (Debian: sudo apt-get install gnuplot-nox); CSV: $csv" >&2
  exit 0
fi
png=$out/$task.png
# One line per (model, top-k) in the CSV, so dense and top-k runs of a model can be compared.
dat=$(mktemp -d)  # one data file per series, for gnuplot only
trap 'rm -rf "$dat"' EXIT
series=$(tail -n +2 "$csv" | awk -F, -v t="$task" '$1 == t {print $2 "," $4}' | awk '!seen[$0]++')
plot=""
for mk in $series; do
  m=${mk%,*} k=${mk#*,}
  f=$dat/$task.$m.$k.dat
  awk -F, -v t="$task" -v m="$m" -v k="$k" '$1 == t && $2 == m && $4 == k {print $3, $6, $7, $8}' "$csv" | sort -n > "$f"
  if [ "$k" = 0 ]; then label="$m, dense"; else label="$m, top-k $k"; fi
  plot+="${plot:+, }'$f' using 1:2:3:4 with yerrorlines title '$label'"
done
gnuplot <<GP
set terminal pngcairo size 900,560 enhanced font ",11"
set output "$png"
set title "$task: accuracy vs memory size (bars: min/max over the seeds; seeds per point in $task.csv)"
set xlabel "tokens in memory"
set ylabel "accuracy"
set logscale x 2
set format x "%.0s%c"
set yrange [-0.02:1.05]
set grid
set key bottom left
plot $plot
GP
echo "wrote $png and $csv" >&2
