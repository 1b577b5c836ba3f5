"""sar-scale cluster submission: job specs, profiles, backends (local, Slurm, Ray Jobs, Kubernetes),
`submit`, `jobs` and `plan`. No training logic lives here."""
