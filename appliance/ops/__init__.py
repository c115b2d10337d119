"""The operator's side: the CLI, doctor, status reports, systemd, file permissions."""
