"""What runs in the launching process: the CLI, the pipeline driver, run-directory preparation, placement
of jobs on nodes, starting and supervising DeepSpeed's launchers, the console and status. Never imported on a
rank (docs/architecture.md, Code layout)."""
