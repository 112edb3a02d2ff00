"""What every stage trains with: the datasets, the nets, the training loop and its
data-parallel form under torchrun. No Hydra, no CLI."""
