"""MFM pretraining with DeepSpeed: `launcher` starts the processes, `trainer` runs the loop,
`checkpoint` owns the run folder, `optim` the recipe's optimiser and schedule, `pictures` the
progress images."""
