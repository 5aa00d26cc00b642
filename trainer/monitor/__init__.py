"""What a run tells its user: the log and metrics.jsonl, trackers, the TrainJob's progress, report.md,
sample answers."""
