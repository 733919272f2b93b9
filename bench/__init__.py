"""The load generator behind `pdserve bench`: workloads, arrival times, statistics and the
goodput search."""
