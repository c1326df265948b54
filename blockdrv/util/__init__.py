"""Small helpers with no blockdrv dependencies: size units and task-group errors."""
