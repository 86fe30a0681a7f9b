"""`coact plan`: what a run will cost (time, host and device memory, disk) and whether it
fits this machine, from the model's config and measured rates, before anything loads."""
