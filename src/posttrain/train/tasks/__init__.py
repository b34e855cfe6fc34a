"""Tasks turn batches into losses; one per training command (registered in ``posttrain.train.commands``)."""
