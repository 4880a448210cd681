"""xlb benchmarks: real traffic through xlb and the baselines it is compared with."""
