"""Run folders, the contract between stages: atomic files and manifests, finding runs,
where a student's teachers come from, and sweep summaries."""
