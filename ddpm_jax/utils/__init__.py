"""Small machinery every layer may use: the cache folder, progress bars, the device mesh, argument checks,
parameter counts."""
