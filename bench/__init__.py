"""The load generator behind `pdserve bench`: workloads, arrival times and statistics."""
