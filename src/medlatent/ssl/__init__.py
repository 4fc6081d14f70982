"""Self-supervised methods: one file per method (encoder + heads + loss + view recipe)."""
