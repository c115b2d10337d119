"""What the box is doing: GPU readings through NVML (never raising); per-tenant stats to come."""
