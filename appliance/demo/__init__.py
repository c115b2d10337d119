"""The built-in demo: its trained tiny model and tenant adapters, and how they are built."""
