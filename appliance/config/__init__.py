"""The settings file, its documented example, and the base model it names."""
