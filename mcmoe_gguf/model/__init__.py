"""What a checkpoint is: the streaming reader, the architecture adapters, the embedded tiny model."""
