"""Online RL with verifiable rewards (the GRPO family): the pure loss (`loss`), rollouts and per-token
log-probabilities (`rollout`), and one step's pieces (`step`: collect a rollout, the loss of its micro-batches).
Below the tasks: nothing here imports frod_cli.tasks at module level (the rewards live in frod_cli/tasks/rewards.py,
beside the answer rules they reuse)."""
