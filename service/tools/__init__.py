"""Command-line tools around the server: the classify client, import-model."""
