"""The drop folder: scan and validate adapter versions, watch for drops, switch versions, plan residency."""
