"""`lora train` and `lora resume`: run folders, the loop, tasks, checkpoints, launching."""
