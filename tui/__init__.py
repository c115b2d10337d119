"""The `lorabox tui` Textual app. It talks to the daemon only through the admin API's JSON."""
