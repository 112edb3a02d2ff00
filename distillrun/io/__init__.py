"""What users hand in and get out: teachers trained elsewhere, exports, predict's inputs."""
