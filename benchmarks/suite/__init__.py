"""What every benchmark shares: the load generator, percentiles and ratios, and the results folder."""
