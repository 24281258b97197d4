"""Commands and the numbers users see: CLI, demo, selfcheck, inspect, baselines, evaluation."""
