"""Batch jobs: the files tenants upload, the jobs, and the runner feeding the fair queue."""
