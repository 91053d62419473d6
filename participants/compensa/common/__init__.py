"""What the orchestrator and the participant SDK share: TLS files, bounded database
connections, health that follows the database, and start-up checks."""
