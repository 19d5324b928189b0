# A migration's timeline, our VMM beside QEMU: memory sent over time (its slope is the
# transfer rate; each pre-copy pass shows as a step), with each VMM's pause (stop-and-copy to
# resume) shaded.
# Inputs: `ours`, `qemu`: files of lines "MS MIB_REMAINING MIB_SENT" (from the start of the
# migration); `ours_pause`, `qemu_pause`: "START_MS END_MS"; `title`.
set terminal pngcairo size 900,500 font ",10"
set output out
set title title
set xlabel "time since the migration started (ms)"
set ylabel "memory sent (MiB)"
set yrange [0:*]
set grid
set key top left
set style fill transparent solid 0.25 noborder
os = real(word(ours_pause, 1)); oe = real(word(ours_pause, 2))
qs = real(word(qemu_pause, 1)); qe = real(word(qemu_pause, 2))
set object 1 rect from os, graph 0 to oe, graph 1 fc rgb "#1f77b4" fs transparent solid 0.2 noborder
set object 2 rect from qs, graph 0 to qe, graph 1 fc rgb "#ff7f0e" fs transparent solid 0.2 noborder
plot ours using 1:3 with steps lw 2 lc rgb "#1f77b4" title sprintf("ours (paused %.1f ms, shaded)", oe - os), \
     qemu using 1:3 with steps lw 2 lc rgb "#ff7f0e" title sprintf("QEMU (paused %.1f ms, shaded)", qe - qs)
