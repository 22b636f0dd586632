"""The outside world: locking, deployment (backup, staging, atomic switch, journal), Hub, notifications, reports."""
