"""The training job, one module per job API; each renders the same pod (infra/jobs/pod.py)."""
