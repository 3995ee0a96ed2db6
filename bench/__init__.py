"""The benchmark suite (issue #5): `python -m bench.run [--quick]`.

Modules: `run` (the command and the order of measurements), `scenarios` (one measured
rollout under load, the floor probe), `load` (load generator with per-request latency),
`monitor` (HAProxy's view every 50 ms), `peers` + `baselines/` (the shell-script and
Ansible peers), `report` and `plot` (BENCHMARKS.md and bench/timeline.png).
"""
