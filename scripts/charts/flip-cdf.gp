# Cumulative distribution of flip latencies. Input `data`: one client-observed latency in
# microseconds per line (any order); `title`.
stats data using 1 nooutput
n = STATS_records
set terminal pngcairo size 900,500 font ",10"
set output out
set title title
set xlabel "flip latency, client-observed (ms, log scale)"
set ylabel "fraction of flips"
set logscale x
set yrange [0:1]
set grid
set key bottom right
plot data using ($1/1000.0):(1.0/n) smooth cumulative with steps lw 2 lc rgb "#1f77b4" title "storaged flip (durable lease write included)"
