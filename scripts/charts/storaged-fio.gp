# Bars: storaged, qemu-nbd and nbdkit per fio job, as a ratio to nbdkit (1.0).
# Input `data`: lines "JOB STORAGED QEMU-NBD NBDKIT" (job names without spaces); `title`.
set terminal pngcairo size 900,500 font ",10"
set output out
set title title
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set ylabel "throughput relative to nbdkit (1.0)"
set yrange [0:*]
set grid ytics
set key outside right top
set xtics nomirror
set arrow from graph 0, first 1 to graph 1, first 1 nohead dashtype 2 lc rgb "#555555"
plot data using ($2/$4):xtic(1) title "storaged" lc rgb "#1f77b4", \
     '' using ($3/$4) title "qemu-nbd" lc rgb "#ff7f0e", \
     '' using ($4/$4) title "nbdkit" lc rgb "#2ca02c"
