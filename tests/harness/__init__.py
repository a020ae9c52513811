"""Test harness shared by the test files and benchmarks: real servers (redis, a redis cluster, Mooncake)
started, paused, killed and stopped (:mod:`harness.servers`), and the pytest fixtures over them
(:mod:`harness.fixtures`)."""
