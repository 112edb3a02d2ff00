"""The method: the losses, ensembles, the specialists' class sets and their KL
combination, augmentations and the teachers' outputs on each view. No Hydra, no CLI."""
