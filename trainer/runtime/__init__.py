"""Process control: the launcher in each pod, local runs, signals and preemption, the output lock, the
process group."""
