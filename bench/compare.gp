# bench/compare.gp: the plot of bench/compare.sh, from the data bench/compare-report.mjs writes.
# gnuplot -e "datadir='bench/results/compare'; outfile='bench/results/compare.png'" bench/compare.gp
if (!exists("datadir")) datadir = 'bench/results/compare'
if (!exists("outfile")) outfile = 'bench/results/compare.png'

set terminal pngcairo size 1500,480 font "sans,10"
set output outfile
set multiplot layout 1,3 title "LLMProxy side by side (medians over runs; bars: min-max)"

set style fill solid 0.6 border -1
set boxwidth 0.6
set grid ytics
set xtics rotate by -25
set key off

set title "Non-stream chat, closed loop: req/s (log scale)"
set logscale y
set yrange [10:*]
plot datadir.'/throughput.dat' using 1:3:xtic(2) with boxes lc rgb "#4477aa", \
     '' using 1:3:4:5 with yerrorbars lc rgb "black" pt 0

set title "Streams: added TTFT p99 vs direct (ms)"
unset logscale y
set yrange [*:*]
plot datadir.'/ttft.dat' using 1:3:xtic(2) with boxes lc rgb "#cc6677", \
     '' using 1:3:4:5 with yerrorbars lc rgb "black" pt 0

set title "Memory: proxy RSS vs concurrent streams held"
set xtics norotate
set xlabel "concurrent streams"
set ylabel "RSS (MiB)"
set yrange [0:*]
set key top left
plot for [i=0:*] datadir.'/memory.dat' index i using 1:2 with linespoints lw 2 pt 7 title columnheader(1)

unset multiplot
